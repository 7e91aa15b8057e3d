"""What a new user hit on a fresh clone (issue "The fast path is the default path"): each with a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_generate, subprocess_env, torchrun

from cosmos3_compiled import cli, distributed
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.schema import unknown_keys


@pytest.mark.parametrize("override,key,hint", [
    ("+promt=x", "promt", "did you mean prompt?"),
    ("+model.nmae=nano", "model.nmae", "did you mean model.name?"),
    ("+sampler.zzz=1", "sampler.zzz", ""),
])
def test_keys_outside_the_schema_are_refused(tmp_path, override, key, hint):
    cfg = compose_generate([override])
    assert unknown_keys(cfg) == [key]
    with pytest.raises(RequestError, match=f"unknown setting '{key}'") as info:
        generate(cfg, tmp_path)
    assert hint in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_free_form_inductor_flags_are_not_unknown_keys():
    assert unknown_keys(compose_generate(["+compile.inductor.deterministic=true"])) == []


@pytest.mark.parametrize("given,device,want", [(None, "cpu", "gloo"), (None, "cuda", "nccl"), ("gloo", "cuda", "gloo")])
def test_process_group_backend_follows_the_device_unless_given(given, device, want):
    assert compose_generate(["parallel=cfg"]).parallel.backend is None  # the default is "follow the device"
    assert distributed.resolve_backend(given, device) == want


def test_nccl_on_the_cpu_is_one_line():
    with pytest.raises(RequestError, match="parallel.backend=nccl needs device=cuda"):
        distributed.resolve_backend("nccl", "cpu")


def _run_cli_failing_with(error: BaseException, tmp_path, monkeypatch) -> int:
    """`cli.run()` with the generation raising `error`, output under tmp_path/out; the exit code."""
    def failing(cfg, out_dir):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "generate", failing)
    monkeypatch.setattr(sys, "argv", ["cosmos3-generate", f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as info:
        cli.run()
    return info.value.code


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    assert _run_cli_failing_with(KeyboardInterrupt(), tmp_path, monkeypatch) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"


def test_cuda_out_of_memory_is_one_line_with_what_to_try(tmp_path, monkeypatch, capsys):
    """A CUDA OOM mid-run (what the fit check below could not foresee) ends in one line and exit 1; the traceback
    goes to cli.log."""
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.21 GiB. GPU 0 has a total capacity of "
                                   "79.18 GiB of which 2.33 GiB is free. If reserved but unallocated memory is large "
                                   "try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    assert _run_cli_failing_with(error, tmp_path, monkeypatch) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA out of memory. Tried to allocate 4.21 GiB"), lines
    assert "compile.offload_text_tower=true" in lines[0] and "parallel.shard=fsdp" in lines[0]
    assert "expandable_segments" not in lines[0]
    log_text = (tmp_path / "out" / "cli.log").read_text()
    assert "Traceback" in log_text and "OutOfMemoryError" in log_text


@pytest.mark.parametrize("text", ["blurry, low quality", "A fox's tail, at dawn (slow)", 'say "hi" = ok \\ back\\',
                                  "ends with a backslash \\", "it''s [a, b] {c: d} $5 ${x}", "a\\'b"])
def test_prompts_arrive_verbatim(text):
    """What the shell hands over for prompt= / negative_prompt= is the prompt, whatever characters it holds."""
    args = cli.quote_free_text([f"prompt={text}", f"negative_prompt={text}", "seed=3"])
    cfg = compose_generate(args)
    assert cfg.prompt == text and cfg.negative_prompt == text and cfg.seed == 3


def test_a_prompt_sweep_keeps_hydra_syntax():
    args = cli.quote_free_text(["-m", "prompt='a fox','a cat'"])
    assert args == ["-m", "prompt='a fox','a cat'"]


def test_prompt_file_replaces_prompt(tmp_path):
    from cosmos3_compiled.request import build_request

    path = tmp_path / "prompt.txt"
    path.write_text("A fox's tail,\nat dawn (slow)\n", encoding="utf-8")
    assert build_request(compose_generate([f"prompt_file={path}"])).prompt == "A fox's tail,\nat dawn (slow)"
    with pytest.raises(RequestError, match="cannot be read"):
        build_request(compose_generate([f"prompt_file={tmp_path / 'missing.txt'}"]))


def test_a_wrongly_typed_transformer_config_value_is_one_line(tmp_path):
    import json

    from cosmos3_compiled.components import write_checkpoint

    folder = write_checkpoint(tmp_path / "ckpt", "debug", seed=0)
    path = folder / "transformer" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "hidden_size": "64"}))
    with pytest.raises(RequestError) as info:
        generate(compose_generate([f"checkpoint={folder}"]), tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "hidden_size must be int, got '64' (str)" in msg


def test_output_dir_is_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.run_dir_overrides([f"output.dir={tmp_path / 'x'}", "seed=1"])
    assert args[-1] == f"hydra.run.dir={tmp_path / 'x'}"  # .hydra/ and cli.log next to the outputs, no ./outputs
    assert cli.run_dir_overrides(["-m", "output.dir=y"]) == ["-m", "output.dir=y"]  # a sweep keeps its job dirs


def test_an_unwritable_working_directory_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # as a non-root user in a read-only folder
    with pytest.raises(SystemExit) as info:
        cli.run_dir_overrides(["seed=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err and "output.dir=" in err


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`cosmos3-generate ARGS` (its module, from this checkout) in `cwd`."""
    env = subprocess_env()
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "cosmos3_compiled.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_failed_run_says_why_once_and_in_its_log(tmp_path):
    out = tmp_path / "out"
    proc = _cli(["height=100", f"output.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "height=100" in errors[0], proc.stderr
    assert "error:" not in proc.stdout  # Hydra's console handler did not print it again
    assert errors[0] in (out / "cli.log").read_text()


class _Store:
    """Stands in for the job's rendezvous store: what rank 0 published, if anything."""

    def __init__(self, published: str | None):
        self.published = published

    def wait(self, keys, timeout):
        if self.published is None:
            raise RuntimeError("Socket Timeout")

    def get(self, key):
        return self.published.encode()


@pytest.mark.parametrize("published,printed", [
    ("error: bad height", ""),  # rank 0 printed this very line: rank 1 adds nothing
    ("error: cannot read /ckpt", "error: rank 1: bad height\n"),  # rank 0 failed otherwise: say this one too
    (None, "error: rank 1: bad height\n"),  # rank 0 runs on (or hangs): only this rank knows
])
def test_other_ranks_print_only_what_rank0_did_not(monkeypatch, capsys, published, printed):
    monkeypatch.setattr(cli, "world_size", lambda: 2)
    monkeypatch.setattr(cli, "is_writer", lambda: False)
    monkeypatch.setattr(cli, "rank", lambda: 1)
    monkeypatch.setattr(cli, "rendezvous_store", lambda: _Store(published))
    with pytest.raises(SystemExit) as info:
        cli.fail("bad height", 2)
    assert info.value.code == 2 and capsys.readouterr().err == printed


def test_another_ranks_error_file_is_dated_after_rank0s(monkeypatch, tmp_path):
    """torchrun names the earliest-dated error file as the root cause: a rank that waits for rank 0 must never
    be dated before rank 0's line, even when it reached the error first."""
    files = {0: tmp_path / "0.json", 1: tmp_path / "1.json"}
    monkeypatch.setattr(cli, "world_size", lambda: 2)
    monkeypatch.setattr(cli, "rendezvous_store", lambda: _Store("error: bad height"))
    monkeypatch.setattr(cli, "_publish_error", lambda line: None)
    for r in (1, 0):  # rank 1 first
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[r]))
        monkeypatch.setattr(cli, "is_writer", lambda r=r: r == 0)
        monkeypatch.setattr(cli, "rank", lambda r=r: r)
        with pytest.raises(SystemExit):
            cli.fail("bad height", 2)
    data = {r: json.loads(f.read_text()) for r, f in files.items()}
    assert data[0]["message"] == "error: bad height" and data[1]["message"] == "error: rank 1: bad height"
    assert data[1]["timestamp"] > data[0]["timestamp"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_request_error_under_torchrun_is_one_line(tmp_path):
    """Every rank refuses the request (before any weights are read); only rank 0 says so."""
    out = tmp_path / "out"
    proc = torchrun(2, ["parallel=cfg", "height=100", f"output.dir={out}"], tmp_path)
    assert proc.returncode != 0, proc.report()
    both = proc.stdout + proc.stderr
    message = "error: height and width must be positive multiples of 16, got height=100 width=128"
    printed = [line for line in both.splitlines() if "error:" in line and "traceback :" not in line]
    assert len(printed) == 1 and printed[0].endswith(message), proc.report()
    # torchrun's failure summary names the line as its root cause (each rank's error file), not a docs pointer
    root_cause = both[both.index("Root Cause"):]
    assert f"traceback : {message}" in root_cause and "To enable traceback" not in both, proc.report()
    line = printed[0]
    log = (out / "cli.log").read_text()  # output.dir is the run directory under torchrun too
    assert log.count(line[line.index("error:"):]) == 1 and "error: rank 1: height" in log, log


@pytest.mark.parametrize("code,rc,err", [(None, 0, ""), (3, 3, ""), ("stopped: why", 1, "stopped: why\n")])
def test_the_fast_exit_flushes_everything_first(tmp_path, code, rc, err):
    """`cli.exit_now` skips the interpreter's teardown: what was printed (stdout a pipe, so buffered) and logged
    must still be out, and the exit status is the one `SystemExit` would give."""
    script = (f"import logging, sys; from cosmos3_compiled.cli import exit_now\n"
              f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
              f"logging.getLogger('x').info('last line'); print('buffered', end='')\n"
              f"exit_now({code!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (rc, "buffered", err)
    assert "last line" in (tmp_path / "log.txt").read_text()
