"""Hydra configs of cosmos3-generate (package data, found by Hydra as cosmos3_compiled.conf)."""
