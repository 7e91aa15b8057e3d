"""`cosmos3-generate`: the Hydra entry point."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .distributed import agree_run_dir
from .errors import RequestError
from .pipeline import generate
from .schema import register_configs

register_configs()
log = logging.getLogger("cosmos3_compiled")


FREE_TEXT = ("prompt", "negative_prompt")


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


def main() -> None:
    """Console script. Under torchrun every rank runs the Hydra app; they first agree on rank 0's run
    directory (see `distributed.agree_run_dir`), so all ranks share one output folder."""
    sys.argv = [sys.argv[0], *agree_run_dir(quote_free_text(sys.argv[1:]))]
    hydra_main()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def hydra_main(cfg: DictConfig) -> str | None:
    out_dir = Path(cfg.output.dir) if cfg.output.dir else Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        state = generate(cfg, out_dir)
    except RequestError as err:
        if multirun:  # let Hydra record the failure; the sweep's other jobs still run
            log.error("job failed: %s", err)
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
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
