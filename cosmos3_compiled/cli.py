"""`cosmos3-generate`: the Hydra entry point."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from .distributed import agree_run_dir
from .errors import RequestError
from .pipeline import generate
from .schema import register_configs

register_configs()
log = logging.getLogger("cosmos3_compiled")


FREE_TEXT = ("prompt", "negative_prompt")
FAILED = "failed.txt"  # in a sweep job's directory: the one-line reason it failed


class SweepSummary(Callback):
    """At the end of a sweep (`-m`): "N of M jobs failed", each failed job's directory and one-line reason, and
    a non-zero exit. Jobs are counted by their directories (each holds Hydra's `.hydra/`), so this also sees
    jobs that a launcher ran in other processes."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted({p.parent.parent for p in sweep.glob(f"**/{config.hydra.output_subdir}/config.yaml")})
        failed = [j for j in jobs if (j / FAILED).is_file()]
        if not failed:
            return
        lines = [f"{len(failed)} of {len(jobs)} jobs failed:"]
        lines += [f"  {j}: {(j / FAILED).read_text().strip()}" for j in failed]
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(1)


def quote_free_text(argv: list[str]) -> list[str]:
    """`prompt=` and `negative_prompt=` values are free text: quote them for Hydra's override grammar so commas,
    apostrophes, quotes and parentheses arrive verbatim. Under `-m`, a value that already starts with a quote is
    left to Hydra (that is how a sweep lists prompts: `-m "prompt='a fox','a cat'"`)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") in FREE_TEXT and not (multirun and value[:1] in ("'", '"')):
            # Hydra reads a backslash as an escape only before a quote or at the end: double just those; and a
            # literal "${" is not an interpolation
            value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            value = value.replace("${", "\\${")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def run_dir_overrides(argv: list[str]) -> list[str]:
    """A single run with `output.dir=X` uses X as Hydra's run directory too (its `.hydra/` and `cli.log` go there,
    nothing appears under ./outputs). Then, before Hydra creates anything, the run directory's nearest existing
    folder must be writable, else one line and exit 2."""
    named = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv if "=" in a}
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun and "output.dir" in named and "hydra.run.dir" not in named:
        argv = [*argv, f"hydra.run.dir={named['output.dir']}"]
        named["hydra.run.dir"] = named["output.dir"]
    target = Path(named.get("hydra.sweep.dir" if multirun else "hydra.run.dir", "multirun" if multirun else "outputs"))
    existing = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        print(f"error: cannot create the run directory {target} ({existing} is not writable); pass "
              f"output.dir=<a writable folder>", file=sys.stderr)
        raise SystemExit(2)
    return argv


def main() -> None:
    """Console script. Under torchrun every rank runs the Hydra app; they first agree on rank 0's run
    directory (see `distributed.agree_run_dir`), so all ranks share one output folder."""
    argv = quote_free_text(sys.argv[1:])
    if any(a in ("--help", "-h", "--cfg", "-c", "--info", "-i") or a.startswith("--shell-completion") for a in argv):
        sys.argv = [sys.argv[0], *argv]  # nothing is run: no run directory
    else:
        sys.argv = [sys.argv[0], *run_dir_overrides(agree_run_dir(argv))]
    hydra_main()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def hydra_main(cfg: DictConfig) -> str | None:
    out_dir = Path(cfg.output.dir) if cfg.output.dir else Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        state = generate(cfg, out_dir)
    except Exception as err:
        if not multirun:
            if not isinstance(err, RequestError):
                raise  # a bug: its traceback helps
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        # a sweep's other jobs still run; `SweepSummary` reports this one at the end
        reason = str(err) if isinstance(err, RequestError) else f"{type(err).__name__}: {err}"
        if isinstance(err, RequestError):
            log.error("job failed: %s", reason)
        else:
            log.exception("job failed: %s", reason)
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / FAILED).write_text(reason.splitlines()[0] + "\n")
        return None
    except KeyboardInterrupt:  # the stages already stopped the encoder and removed partial outputs
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    for name, path in state.outputs.items():
        log.info("%s: %s", name, path)
    if state.sha256 is not None:  # global rank 0 only under torchrun
        print(f"sha256 {state.sha256}")
    return state.sha256


if __name__ == "__main__":
    main()
