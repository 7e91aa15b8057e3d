"""`cosmos3-generate`: the Hydra entry point."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from .distributed import agree_run_dir, is_writer, rank, rendezvous_store, world_size
from .errors import RequestError
from .pipeline import generate
from .schema import register_configs

register_configs()
log = logging.getLogger("cosmos3_compiled")


FREE_TEXT = ("prompt", "negative_prompt")
FAILED = "failed.txt"  # in a sweep job's directory: the one-line reason it failed
ERROR_KEY = "cosmos3/error"  # in the job's rendezvous store: the error line global rank 0 printed
RANK0_WAIT_S = 10.0  # how long another rank waits for rank 0's error line before printing its own
DONE_KEY = "cosmos3/error_ranks_done"  # counts the other ranks that have logged (and, if need be, printed) theirs
OTHERS_WAIT_S = 5.0  # how long rank 0 waits for them before it exits (its exit makes torchrun stop them)


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


def fail(message: str, code: int, wait_for_rank0: bool = True) -> NoReturn:
    """The end of a run that cannot go on: `error: <message>` on stderr and in the run's log file, exit `code`.

    Under several processes (torchrun) every rank usually meets the same error, and it shows once: global rank
    0 prints it; every other rank waits until rank 0 has (torchrun stops the other ranks as soon as one exits,
    which could kill rank 0 before its line), then exits with the same code, its line only in the log file
    (`error: rank N: ...`). A rank whose error rank 0 did not report in time prints its own, naming its rank.
    Rank 0 exits only once the others have done so (or after `OTHERS_WAIT_S`), since its exit ends them."""
    line = f"error: {message}"
    if world_size() <= 1 or is_writer():
        _tell_torchrun(line)
    else:  # dated after its wait for rank 0, so torchrun names rank 0's line as the root cause when it has one
        _tell_torchrun(f"error: rank {rank()}: {message}", delay_s=RANK0_WAIT_S if wait_for_rank0 else 0.0)
    if world_size() <= 1:
        print(line, file=sys.stderr)
        log_to_file(line)
    elif is_writer():
        print(line, file=sys.stderr, flush=True)
        log_to_file(line)
        _publish_error(line)
        if wait_for_rank0:
            _wait_for_other_ranks()
    else:
        mine = f"error: rank {rank()}: {message}"
        log_to_file(mine)
        if not (wait_for_rank0 and _rank0_reported(line)):
            print(mine, file=sys.stderr, flush=True)
        _count_done()
    raise SystemExit(code) from None


def _tell_torchrun(line: str, delay_s: float = 0.0) -> None:
    """Under torchrun, `line` as this rank's error file: torchrun's failure summary then names it as the root
    cause instead of a pointer to its docs (its own traceback above the summary is not ours to remove).

    torchrun's root cause is the failure with the earliest timestamp (whole seconds). The file is written at
    once, so that it exists even if the launcher stops this process a moment later, but its timestamp is
    `delay_s` ahead: a rank that first waits for rank 0 is dated after rank 0's own line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time() + delay_s)}))
    except OSError:  # the launcher's folder gone: the line is still printed
        pass


def _publish_error(line: str) -> None:
    try:
        rendezvous_store().set(ERROR_KEY, line)
    except Exception:  # the store's own failure must not hide the error just printed
        pass


def _count_done() -> None:
    try:
        rendezvous_store().add(DONE_KEY, 1)
    except Exception:  # no store: rank 0 stops waiting at its deadline
        pass


def _wait_for_other_ranks() -> None:
    """Until every other rank has counted itself done (`_count_done`), at most `OTHERS_WAIT_S`."""
    deadline = time.monotonic() + OTHERS_WAIT_S
    try:
        store = rendezvous_store()
        while store.add(DONE_KEY, 0) < world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    except Exception:  # the store is gone: nothing left to wait for
        pass


def _rank0_reported(line: str) -> bool:
    """Whether global rank 0 reported this same error line, waiting for it up to `RANK0_WAIT_S`."""
    try:
        store = rendezvous_store()
        store.wait([ERROR_KEY], timedelta(seconds=RANK0_WAIT_S))
        return store.get(ERROR_KEY).decode() == line
    except Exception:  # not in time (rank 0 runs on, or failed otherwise) or the store is gone
        return False


def log_to_file(line: str) -> None:
    """`line` as an error record in the run's log file (Hydra's job-logging `FileHandler`s on the root logger,
    i.e. `cli.log`) but not on the console, which has it already. Before Hydra set up logging: nothing."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


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
        fail(f"cannot create the run directory {target} ({existing} is not writable); pass "
             f"output.dir=<a writable folder>", 2)
    return argv


def main() -> NoReturn:
    """Console script (and `python -m cosmos3_compiled.cli`): `run`, then the process ends at once with its exit
    status (`exit_now`)."""
    try:
        run()
        code = 0
    except SystemExit as end:
        code = end.code
    exit_now(code)


def out_of_memory_line(err: BaseException) -> str:
    """One line for a CUDA out-of-memory error (its traceback goes to the log file): what ran out and what to try."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
    first = first.split(" If reserved but unallocated")[0].rstrip(".")
    return (f"{first}. Try: compile.offload_text_tower=true (text weights in host memory), model.vae_tiles=4 "
            "(the decode in strips), a smaller request, or the weights sharded over GPUs (torchrun ... "
            "parallel.shard=fsdp)")


def exit_now(code) -> NoReturn:
    """End the process with `code` (a `SystemExit` code) once stdout, stderr and the log files are flushed,
    skipping the interpreter's teardown: every output is already complete on disk, the process group is torn
    down, and unwinding torch (its modules, CUDA context, compile workers) only delays the shell's prompt."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run() -> None:
    """The Hydra app on this process's arguments. Under torchrun every rank runs it; they first agree on rank 0's
    run directory (see `distributed.agree_run_dir`), so all ranks share one output folder."""
    argv = quote_free_text(sys.argv[1:])
    if any(a in ("--help", "-h", "--cfg", "-c", "--info", "-i") or a.startswith("--shell-completion") for a in argv):
        sys.argv = [sys.argv[0], *argv]  # nothing is run: no run directory
    else:
        # output.dir first: it names the run directory, which agree_run_dir then leaves alone
        sys.argv = [sys.argv[0], *agree_run_dir(run_dir_overrides(argv))]
    hydra_main()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def hydra_main(cfg: DictConfig) -> str | None:
    out_dir = Path(cfg.output.dir) if cfg.output.dir else Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        state = generate(cfg, out_dir)
    except Exception as err:
        oom = isinstance(err, torch.OutOfMemoryError)
        if oom:
            reason = out_of_memory_line(err)
        else:
            reason = str(err) if isinstance(err, RequestError) else f"{type(err).__name__}: {err}"
        if not multirun:
            if oom:
                log_to_file(traceback.format_exc())
                fail(reason, 1)
            if not isinstance(err, RequestError):
                raise  # a bug: its traceback helps
            fail(reason, 2)
        # a sweep's other jobs still run; `SweepSummary` reports this one at the end
        if isinstance(err, RequestError):
            log.error("job failed: %s", reason)
        else:
            log.exception("job failed: %s", reason)
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / FAILED).write_text(reason.splitlines()[0] + "\n")
        return None
    except KeyboardInterrupt:  # the stages already stopped the encoder and removed partial outputs
        fail("interrupted", 130, wait_for_rank0=False)  # every rank got the signal: no waiting
    for name, path in state.outputs.items():
        log.info("%s: %s", name, path)
    if state.sha256 is not None:  # global rank 0 only under torchrun
        print(f"sha256 {state.sha256}")
    return state.sha256


if __name__ == "__main__":
    main()
