"""Every `cosmos3-generate` command in README.md's fenced code blocks still works as written. README.md is read when
the tests are collected, so an edited README is checked as it stands: a command small enough for the CPU is run for
real (into a temporary folder), one that needs a GPU, several processes, a big model or the reader's own files is
composed only (`--cfg job` must exit 0; `checkpoint=` points at a tiny checkpoint), and a command this file cannot
classify fails, saying how to mark it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import CONF_DIR, subprocess_env
from hydra.core.override_parser.overrides_parser import OverridesParser

from cosmos3_compiled import cli
from cosmos3_compiled.components import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HERE = "tests/test_readme_commands.py"

GPU = "needs a GPU"
INDUCTOR = "an inductor compile: minutes on a 2-core CPU"
NANO = "a Nano-size model: too big for a CPU test"
PROCESSES = "several processes (torchrun)"
FILES = "names a file only the reader has"
ANY = "*"

# key → {value: why the command is only composed}; ANY: whatever the value
COMPOSE_ONLY = {
    "device": {"cuda": GPU},
    "compile": {"cudagraph": GPU, "reduce_overhead": GPU, "max_autotune": GPU,
                "default": INDUCTOR, "max_autotune_no_cudagraphs": INDUCTOR},
    "compile.vae": {"default": INDUCTOR},
    "model.attention_backend": {"fa4": GPU},
    "model": {"nano": NANO},
    "experiment": {ANY: NANO},  # every overlay is a Nano-size request
    "checkpoint": {ANY: "a real checkpoint (composed with a tiny one in its place)"},
    "checkpoint_revision": {ANY: "a Hub revision of a real checkpoint"},
    "hydra/launcher": {ANY: "a submitit launcher (cluster jobs or extra processes)"},
    "parallel": {"cfg": PROCESSES, "ulysses": PROCESSES, "cfg_ulysses": PROCESSES},
    "image": {ANY: FILES},
    "video": {ANY: FILES},
    "prompt_file": {ANY: FILES},
}
COMPOSE_ONLY_PREFIXES = {"hydra.launcher.": "a submitit launcher's setting"}
# keys a CPU run of the tiny default model takes in seconds, whatever their value
CPU_KEYS = {"prompt", "negative_prompt", "seed", "height", "width", "num_frames", "fps", "dtype", "keep_loaded",
            "output.dir", "hydra.run.dir", "hydra.sweep.dir", "model.vae_tiles", "model.batch_cfg",
            "compile.cache_dir", "condition_frames", "condition_keep", "add_resolution_template",
            "add_duration_template"}
CPU_PREFIXES = ("sampler.", "output.", "compile.inductor.")
# keys a CPU run takes in seconds with these values only
CPU_VALUES = {"device": {"cpu", "auto"}, "compile": {"eager", "auto"}, "model": {"debug", "debug_edge"},
              "parallel": {"none"}, "sampler": {"default", "flow_shift"}, "output": {"default"}}
MAX_PIXELS = 256 * 256 * 17  # height × width × frames of a real CPU run; more: composed only
MAX_JOBS = 4  # jobs of a sweep run for real; more: composed only
DEFAULT_SIZE = {"height": 128, "width": 128, "num_frames": 9}  # conf/model/debug.yaml
SHELL = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "2>&1"}


class Unclassified(Exception):
    """A README command this file cannot tell how to check."""


@dataclass(frozen=True)
class Command:
    line: int  # README line where it starts
    text: str  # as written, continuation lines joined
    words: list[str]  # shell-split, comments dropped
    args: list[str] | None = None  # what follows `cosmos3-generate` (or torchrun's `-m cosmos3_compiled.cli`)
    torchrun: bool = False


@dataclass
class Plan:
    """How to check one command: run it for real (`reasons` empty) or compose each job's overrides."""

    reasons: list[str]
    multirun: bool
    jobs: list[list[str]] = field(default_factory=list)  # compose: one override list per job to compose
    num_jobs: int = 1  # run: the sweep's job count


# ---- reading README.md ---------------------------------------------------------------------------------


def extract(markdown: str) -> list[Command]:
    """Commands in shell code fences (bash, sh, shell, console, no language) that name `cosmos3-generate` or the
    CLI module, as the shell reads them: `\\` line continuations joined, comments dropped."""
    commands, fence, pending, start = [], None, "", 0
    for number, raw in enumerate(markdown.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith(("```", "~~~")):
            fence = None if fence is not None else stripped[3:].strip().lower()
            pending = ""
            continue
        if fence is None or fence not in ("bash", "sh", "shell", "console", "zsh", ""):
            continue
        if not pending:
            if not stripped or stripped.startswith("#"):
                continue
            start = number
        if raw.endswith("\\"):  # the shell drops backslash-newline
            pending += raw[:-1]
            continue
        text, pending = (pending + raw).strip(), ""
        text = text.removeprefix("$ ")
        words = shlex.split(text, comments=True)
        if "cosmos3-generate" not in words and "cosmos3_compiled.cli" not in words:
            continue
        if words[0] == "cosmos3-generate":
            commands.append(Command(start, text, words, words[1:]))
        elif words[0] in ("torchrun", "python", "python3") and words[words.index("cosmos3_compiled.cli") - 1] == "-m":
            commands.append(Command(start, text, words, words[words.index("cosmos3_compiled.cli") + 1:],
                                    torchrun=words[0] == "torchrun"))
        else:  # e.g. behind environment variables or another program: say so rather than skip it
            commands.append(Command(start, text, words))
    return commands


def readme_commands() -> list[Command]:
    return extract(README.read_text(encoding="utf-8"))


# ---- classifying ---------------------------------------------------------------------------------------


def _how_to_mark(what: str, command: Command) -> Unclassified:
    return Unclassified(
        f"README.md:{command.line}: `{command.text}`: {what}. Mark it in {HERE}: a key whose run takes seconds on "
        f"a 2-core CPU whatever its value goes in CPU_KEYS (or CPU_PREFIXES), one fine with some values only in "
        f"CPU_VALUES[key]; a key or value that must only be composed (GPU, several processes, big model, the "
        f"reader's own files) goes in COMPOSE_ONLY[key] (or COMPOSE_ONLY_PREFIXES) with the reason")


def _values(override) -> list[str]:
    if not override.is_sweep_override():
        return [str(override.value())]
    return list(override.sweep_string_iterator())


def _group_keys() -> set[str]:
    found = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    return found | {f"hydra/{p.name}" for p in (CONF_DIR / "hydra").iterdir() if p.is_dir()}


def plan(command: Command, checkpoint: Path) -> Plan:
    """Run or compose, and why; raises `Unclassified` for a command this file cannot judge."""
    if command.args is None:
        raise _how_to_mark("not `cosmos3-generate ARGS` nor `torchrun ... -m cosmos3_compiled.cli ARGS`", command)
    if shell := SHELL.intersection(command.words):
        raise _how_to_mark(f"shell syntax {sorted(shell)}", command)
    multirun = any(a in ("-m", "--multirun") for a in command.args)
    args = [a for a in command.args if a not in ("-m", "--multirun")]
    if flags := [a for a in args if a.startswith("-")]:
        raise _how_to_mark(f"option {flags[0]}", command)
    quoted = [a for a in cli.quote_free_text(command.args) if a not in ("-m", "--multirun")]
    overrides = OverridesParser.create().parse_overrides(quoted)
    reasons = [PROCESSES] if command.torchrun else []
    values, unknown = {}, []  # unknown settings: fine where composing checks them, else unclassifiable
    for override in overrides:
        key = override.key_or_group
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise _how_to_mark(f"a non-discrete sweep {override.input_line}", command)
        values[key] = _values(override)
        rule = COMPOSE_ONLY.get(key, {})
        why = [rule[v] for v in values[key] if v in rule] + ([rule[ANY]] if ANY in rule else [])
        why += [r for prefix, r in COMPOSE_ONLY_PREFIXES.items() if key.startswith(prefix)]
        cpu = (key in CPU_KEYS or key.startswith(CPU_PREFIXES)
               or (key in CPU_VALUES and set(values[key]) <= CPU_VALUES[key]))
        reasons += why
        if not why and not cpu:
            unknown.append(override.input_line)
    pixels = 1
    for key, default in DEFAULT_SIZE.items():
        try:
            pixels *= max(int(v) for v in values.get(key, [default]))
        except ValueError:
            pass  # an interpolation: the model's default
    if pixels > MAX_PIXELS:
        reasons.append(f"a request of {pixels} pixels: too big for a CPU test")
    num_jobs = 1
    for override in overrides:
        num_jobs *= len(values[override.key_or_group]) if override.is_sweep_override() else 1
    if multirun and num_jobs > MAX_JOBS:
        reasons.append(f"a sweep of {num_jobs} jobs")
    if not reasons and unknown:
        raise _how_to_mark(f"unknown setting {unknown[0]}", command)
    if not reasons:
        return Plan([], multirun, num_jobs=num_jobs)
    # composed only: `--cfg job` takes no sweep, so compose jobs that between them use every option of every
    # swept config group (swept plain values are taken in turn alongside)
    groups = _group_keys()
    swept = [o for o in overrides if o.is_sweep_override()]
    count = max([len(values[o.key_or_group]) for o in swept if o.key_or_group in groups] or [1])
    jobs = []
    for i in range(count):
        job = []
        for arg, override in zip(args, overrides, strict=True):
            key = override.key_or_group
            if key == "checkpoint":
                job.append(f"{override.get_key_element()}={checkpoint}")
            elif override.is_sweep_override():
                value = values[key][i % len(values[key])]
                if key in cli.FREE_TEXT and value[:1] == value[-1:] and value[:1] in ("'", '"'):
                    value = value[1:-1]  # the CLI quotes free text itself
                job.append(f"{override.get_key_element()}={value}")
            else:
                job.append(arg)
        jobs.append(job)
    return Plan(list(dict.fromkeys(reasons)), multirun, jobs=jobs)


# ---- checking ------------------------------------------------------------------------------------------


def _env(cpu_only: bool) -> dict:
    env = subprocess_env()
    env.pop("HYDRA_FULL_ERROR", None)
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _cli(args: list[str], cwd: Path, cpu_only: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cosmos3_compiled.cli", *args], cwd=cwd, env=_env(cpu_only),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _without(args: list[str], keys: set[str]) -> list[str]:
    return [a for a in args if a.split("=", 1)[0].lstrip("+~") not in keys]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("readme") / "cosmos3-debug", name="debug")


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: f"README.md:{c.line}")
def test_readme_command(command, tiny_checkpoint, tmp_path):
    try:
        how = plan(command, tiny_checkpoint)
    except Unclassified as err:
        how = err
    if isinstance(how, Unclassified):
        pytest.fail(str(how), pytrace=False)
    where = f"README.md:{command.line}: `{command.text}`"
    if how.reasons:  # composed only; the jobs side by side (each is mostly interpreter start-up)
        procs = [(job, _cli([*job, "--cfg", "job"], cwd=tmp_path)) for job in how.jobs]
        for job, proc in procs:
            code, out, err = _finish(proc)
            assert code == 0, f"{where} ({'; '.join(how.reasons)}) does not compose as {job}:\n{err[-3000:]}"
            if any(a.startswith("checkpoint=") for a in job):
                assert f"checkpoint: {tiny_checkpoint}" in out, out
        return
    # run for real on the CPU, everything written under tmp_path
    if how.multirun:
        sweep = tmp_path / "sweep"
        args = [*_without(command.args, {"hydra.sweep.dir", "output.dir"}), f"hydra.sweep.dir={sweep}"]
    else:
        out_dir = tmp_path / "out"
        args = [*_without(command.args, {"hydra.run.dir", "output.dir"}), f"output.dir={out_dir}"]
    code, out, err = _finish(_cli(args, cwd=tmp_path, cpu_only=True))
    assert code == 0, f"{where} failed (run as {args}):\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    runs = sorted({p.parent for p in tmp_path.rglob("metrics.json")})
    assert len(runs) == how.num_jobs and out.count("sha256 ") == how.num_jobs, (runs, out)
    for run in runs:
        assert (run / "video.mp4").is_file() or (run / "image.png").is_file(), sorted(run.iterdir())


# ---- the checks above cannot pass vacuously ----------------------------------------------------------------


SAMPLE = """
Some text with `cosmos3-generate inline=1` (not a fenced block).

```bash
pip install -e .            # not ours
# cosmos3-generate commented=out
cosmos3-generate                                 # the default run
cosmos3-generate checkpoint=/models/X device=cuda \\
  prompt="A fox's tail, at dawn" negative_prompt='blurry, low'
torchrun --nproc-per-node 2 -m cosmos3_compiled.cli parallel=cfg device=cuda prompt='...'
OMP_NUM_THREADS=1 cosmos3-generate seed=1
```

```python
print("cosmos3-generate")
```
"""


def test_commands_are_read_as_the_shell_reads_them():
    found = extract(SAMPLE)
    assert [c.line for c in found] == [7, 8, 10, 11]
    default, gpu, launched, behind_env = found
    assert default.args == [] and not default.torchrun
    assert gpu.args == ["checkpoint=/models/X", "device=cuda", "prompt=A fox's tail, at dawn",
                        "negative_prompt=blurry, low"]
    assert launched.torchrun and launched.args == ["parallel=cfg", "device=cuda", "prompt=..."]
    assert behind_env.args is None


def test_commands_are_classified(tmp_path):
    default, gpu, launched, behind_env = extract(SAMPLE)
    assert plan(default, tmp_path) == Plan([], False, num_jobs=1)
    composed = plan(gpu, tmp_path)
    assert GPU in composed.reasons and composed.jobs == [[f"checkpoint={tmp_path}", "device=cuda",
                                                          "prompt=A fox's tail, at dawn", "negative_prompt=blurry, low"]]
    assert PROCESSES in plan(launched, tmp_path).reasons
    sweep = Command(1, "", [], ["-m", "compile=eager,cudagraph", "seed=0,1,2", "prompt='a','b'"])
    assert plan(sweep, tmp_path).jobs == [["compile=eager", "seed=0", "prompt=a"],
                                          ["compile=cudagraph", "seed=1", "prompt=b"]]
    small_sweep = Command(1, "", [], ["-m", "seed=0,1", "sampler.num_inference_steps=2,4"])
    assert plan(small_sweep, tmp_path) == Plan([], True, num_jobs=4)
    for unknown in (behind_env, Command(3, "x", ["cosmos3-generate", "+model.zzz=1"], ["+model.zzz=1"]),
                    Command(3, "x", ["cosmos3-generate", "--info"], ["--info"])):
        with pytest.raises(Unclassified, match=f"Mark it in {HERE}"):
            plan(unknown, tmp_path)
    # an unknown setting of a command composed anyway is left to the composition to judge
    assert plan(Command(3, "x", [], ["device=cuda", "+model.zzz=1"]), tmp_path).jobs == [["device=cuda", "+model.zzz=1"]]


def test_the_readme_has_commands_run_for_real(tmp_path):
    commands = readme_commands()
    assert commands, "no `cosmos3-generate` command found in README.md's code blocks"
    real = []
    for command in commands:
        try:
            real += [command] if not plan(command, tmp_path).reasons else []
        except Unclassified:
            pass  # its own test fails, saying why
    assert real, "every README command is composed only: none shows that a plain run works"
