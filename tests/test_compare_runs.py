"""tools/compare_runs.py: run folders (one GPU vs parallel layouts) compared against a reference run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_runs.py"


def _run_dir(path: Path, frames: np.ndarray | None, parallel: dict | None, decode_s: float) -> Path:
    path.mkdir(parents=True)
    metrics = {"seconds": {"decode": decode_s, "total": 9.0}, "steps": {"first_s": 2.0, "steady_median_s": 0.5},
               "peak_memory_gib": 3.25, "sha256": "ab" * 32}
    if parallel:
        metrics["parallel"] = parallel
    (path / "metrics.json").write_text(json.dumps(metrics))
    if frames is not None:
        save_file({"frames": frames}, str(path / "frames.safetensors"))
    return path


def test_table_reports_layout_and_frame_differences(tmp_path):
    frames = np.linspace(0, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    shifted = frames.copy()
    shifted[0, 0, 0, 0] += 0.25
    ref = _run_dir(tmp_path / "one_gpu", frames, None, 4.0)
    cfg = _run_dir(tmp_path / "cfg", frames.copy(), {"world_size": 2, "cfg": True, "ulysses": 1, "vae_rows": True}, 2.5)
    uly = _run_dir(tmp_path / "ulysses2", shifted, {"world_size": 2, "cfg": False, "ulysses": 2, "vae_rows": False}, 4.0)
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, str(TOOL), str(ref), str(cfg), str(uly), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in res.stdout.splitlines()[2:]}
    assert rows["one_gpu"][:2] == ["none", "1"] and rows["one_gpu"][7] == "identical"
    assert rows["cfg"][:2] == ["cfg + row-parallel decode", "2"] and rows["cfg"][4] == "2.50"
    assert rows["cfg"][7] == "identical"
    assert rows["ulysses2"][0] == "ulysses-2"
    assert rows["ulysses2"][6] == "0.25"
    mse = 0.25 ** 2 / frames.size
    assert rows["ulysses2"][7] == f"{10 * np.log10(1 / mse):.1f} dB"
    assert out.read_text() == res.stdout


def test_missing_metrics_is_an_error(tmp_path):
    ref = _run_dir(tmp_path / "one_gpu", None, None, 1.0)
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, str(TOOL), str(ref), str(tmp_path / "empty")], capture_output=True, text=True)
    assert res.returncode == 2 and "no metrics.json" in res.stderr
