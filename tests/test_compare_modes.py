"""tools/compare_compile_modes.py: a real tiny compile-mode multirun on the CPU, and handcrafted sweeps."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_compile_modes.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_compile_modes", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(out: Path, n_rows: int) -> list[dict]:
    md = (out / "compile_modes.md").read_text()
    assert md.startswith("# Compile-mode comparison")
    assert "| job | status | compile s |" in md
    rows = _read_csv(out / "compile_modes.csv")
    assert len(rows) == n_rows
    assert list(rows[0].keys()) == tool.COLUMNS
    png = (out / "compile_modes.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    return rows


# --------------------------------------------------------------------------------------------------------------
# Real sweep


@pytest.mark.inductor
@pytest.mark.slow
def test_real_two_mode_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "compile=eager,default", "height=32", "width=32", "num_frames=5", "sampler.num_inference_steps=2",
            "output.frames=float32", "output.progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "-m", "cosmos3_compiled.cli", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = subprocess.run([sys.executable, str(TOOL), str(sweep)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _check_outputs(sweep, 2)
    eager, default = rows
    assert (eager["label"], eager["compile_mode"], eager["status"]) == ("compile=eager", "eager", "ok")
    assert (default["label"], default["compile_mode"], default["status"]) == ("compile=default", "default", "ok")
    assert float(eager["max_abs_diff"]) == 0.0 and eager["psnr_db"] == "inf"
    max_abs = float(default["max_abs_diff"])
    assert math.isfinite(max_abs) and max_abs < 1e-3
    assert float(default["psnr_db"]) > 60  # finite, or inf if inductor happens to be bit-exact here
    for r in rows:
        assert float(r["steady_step_s"]) > 0 and float(r["total_s"]) > 0 and float(r["compile_s"]) >= 0
        assert r["graph_breaks"] == "0" and r["recompiles"] == "0" and len(r["sha256"]) == 64
        assert r["peak_memory_gib"] == ""  # CPU: no GPU memory recorded
    assert float(eager["speedup_vs_eager"]) == 1.0 and float(default["speedup_vs_default"]) == 1.0
    md = (sweep / "compile_modes.md").read_text()
    assert "- device: cpu" in md
    assert ("cosmos3-generate -m compile=eager,default height=32 width=32 num_frames=5 "
            f"sampler.num_inference_steps=2 output.frames=float32 output.progress=false hydra.sweep.dir={sweep}") in md
    assert "| `compile=default` | ok |" in md


# --------------------------------------------------------------------------------------------------------------
# Handcrafted sweeps


def _job(sweep: Path, n: int, overrides: list[str], mode: str, frames: np.ndarray | None, *, first=None,
         steady=None, total=None, failed_msg: str | None = None, device="cuda", extra=None) -> Path:
    d = sweep / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"device": device, "dtype": "bfloat16", "seed": 0, "compile": {"mode": mode, "scope": "blocks"}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if failed_msg is not None:
        (d / "cli.log").write_text(f"[2026-01-01 00:00:00,000][cosmos3_compiled][ERROR] - job failed: {failed_msg}\n")
        return d
    if frames is not None:
        save_file({"frames": frames}, str(d / "frames.safetensors"))
    metrics = {
        "config": config,
        "seconds": {"load": 1.0, "denoise": first + steady, "total": total},
        "steps": {"first_s": first, "steady_median_s": steady, "all_s": [first, steady]},
        "compile": {"graph_breaks": 0, "unique_graphs": 2, "recompiles": 1 if mode == "cudagraph" else 0,
                    "mode": mode, "scope": "blocks", "warm_cache": False},
        "sha256": f"{n:064x}", "peak_memory_gib": 10.0 + n, **(extra or {}),
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_synthetic_sweep_with_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    ref = rng.random((2, 3, 4, 8, 8), dtype=np.float32)
    delta = np.zeros_like(ref)
    delta[0, 0, 0, 0, 0] = 0.01
    common = ["output.frames=float32", "height=64"]
    _job(sweep, 0, ["compile=eager", *common], "eager", ref, first=2.0, steady=2.0, total=30.0,
         extra={"env": {"torch_version": "2.11.0", "device_name": "NVIDIA H100 80GB HBM3"}})
    _job(sweep, 1, ["compile=default", *common], "default", ref + delta, first=40.0, steady=1.0, total=60.0)
    _job(sweep, 2, ["compile=cudagraph", *common], "cudagraph", None, failed_msg="CUDA out of memory")
    _job(sweep, 3, ["compile=reduce_overhead", *common], "reduce_overhead", ref, first=0.1, steady=0.5, total=20.0)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {
        "hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"],
        "task": ["compile=eager,default,cudagraph,reduce_overhead", *common]}}}))

    out = tmp_path / "report"
    assert tool.main([str(sweep), "--out", str(out)]) == 0
    rows = _check_outputs(out, 4)
    by = {r["label"]: r for r in rows}
    assert list(by) == ["compile=eager", "compile=default", "compile=cudagraph", "compile=reduce_overhead"]

    e, d, c, r = (by[k] for k in by)
    assert e["max_abs_diff"] == "0.0" and e["psnr_db"] == "inf" and e["speedup_vs_eager"] == "1.0"
    assert float(d["max_abs_diff"]) == pytest.approx(0.01, rel=1e-5)
    mse = 0.01 ** 2 / ref.size
    assert float(d["psnr_db"]) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert float(d["compile_s"]) == 39.0 and float(d["first_step_s"]) == 40.0 and float(d["total_s"]) == 60.0
    assert float(d["speedup_vs_eager"]) == 2.0 and float(d["speedup_vs_default"]) == 1.0
    assert float(e["speedup_vs_default"]) == 0.5
    assert float(d["peak_memory_gib"]) == 11.0 and d["reference"] == "compile=eager"
    # failed job: a row, marked failed, with the log's error, and no numbers
    assert c["status"] == "failed" and c["error"] == "job failed: CUDA out of memory" and c["compile_mode"] == "cudagraph"
    assert c["steady_step_s"] == "" and c["max_abs_diff"] == "" and c["sha256"] == ""
    # first step faster than steady → compile seconds floored at 0
    assert float(r["compile_s"]) == 0.0 and float(r["speedup_vs_eager"]) == 4.0 and r["recompiles"] == "0"

    md = (out / "compile_modes.md").read_text()
    assert "- device: cuda (NVIDIA H100 80GB HBM3)" in md and "- torch: 2.11.0" in md
    assert (f"cosmos3-generate -m compile=eager,default,cudagraph,reduce_overhead output.frames=float32 height=64 "
            f"hydra.sweep.dir={sweep}") in md
    assert "failed: job failed: CUDA out of memory" in md
    assert "3 of 4 jobs finished" in md


def test_no_eager_job_other_sweep_keys_and_reconstructed_command(tmp_path):
    """Sweep over seed × compile without multirun.yaml: each seed compares against its own eager job; uint8 frames
    use peak 255; with no eager job at all, the first finished job is the reference."""
    sweep = tmp_path / "sweep"
    f0 = np.zeros((1, 3, 1, 4, 4), np.uint8)
    f1 = np.full((1, 3, 1, 4, 4), 7, np.uint8)
    _job(sweep, 0, ["seed=0", "compile=eager"], "eager", f0, first=1.0, steady=1.0, total=5.0, device="cpu")
    _job(sweep, 1, ["seed=0", "compile=default"], "default", f0 + 1, first=9.0, steady=0.5, total=12.0, device="cpu")
    _job(sweep, 2, ["seed=1", "compile=eager"], "eager", f1, first=1.0, steady=2.0, total=5.0, device="cpu")
    _job(sweep, 3, ["seed=1", "compile=default"], "default", f1, first=9.0, steady=0.5, total=12.0, device="cpu")
    out = tmp_path / "out"
    assert tool.main([str(sweep), "--out", str(out)]) == 0
    rows = {r["label"]: r for r in _check_outputs(out, 4)}
    a, b = rows["seed=0 compile=default"], rows["seed=1 compile=default"]
    assert a["reference"] == "seed=0 compile=eager" and b["reference"] == "seed=1 compile=eager"
    assert float(a["max_abs_diff"]) == 1.0 and float(a["psnr_db"]) == pytest.approx(20 * math.log10(255), rel=1e-6)
    assert b["max_abs_diff"] == "0.0" and b["psnr_db"] == "inf"
    assert float(a["speedup_vs_eager"]) == 2.0 and float(b["speedup_vs_eager"]) == 4.0
    md = (out / "compile_modes.md").read_text()
    assert f"cosmos3-generate -m seed=0,1 compile=eager,default hydra.sweep.dir={sweep}" in md
    assert "- device: cpu" in md and "torch:" not in md

    sweep2 = tmp_path / "sweep2"
    _job(sweep2, 0, ["compile=default"], "default", f0, first=9.0, steady=0.5, total=12.0)
    _job(sweep2, 1, ["compile=cudagraph"], "cudagraph", f0 + 2, first=9.0, steady=0.25, total=12.0)
    assert tool.main([str(sweep2), "--no-png"]) == 0
    rows = _read_csv(sweep2 / "compile_modes.csv")
    assert [r["reference"] for r in rows] == ["compile=default", "compile=default"]
    assert rows[1]["max_abs_diff"] == "2.0" and rows[1]["speedup_vs_eager"] == "" and rows[1]["speedup_vs_default"] == "2.0"
    assert not (sweep2 / "compile_modes.png").exists()


def test_help_runs():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sweep_dir" in proc.stdout and "--out" in proc.stdout
