"""What a new user hit on a fresh clone (issue "The fast path is the default path"): each with a test."""

from __future__ import annotations

import sys

import pytest
from helpers import compose_generate

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


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, out_dir):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "generate", interrupted)
    monkeypatch.setattr(sys, "argv", ["cosmos3-generate", f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
