"""Test helper: compose the real Hydra configs with the Compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from cosmos3_compiled.schema import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "cosmos3_compiled" / "conf"


def compose_generate(overrides: list[str] | None = None, return_hydra_config: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides or []),
                       return_hydra_config=return_hydra_config)
