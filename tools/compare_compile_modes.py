#!/usr/bin/env python
"""Compare the jobs of a cosmos3-generate Hydra multirun (typically a sweep over compile modes).

    cosmos3-generate -m compile=eager,default,cudagraph output.frames=float32 hydra.sweep.dir=DIR
    python tools/compare_compile_modes.py DIR [--out OUT]

Reads DIR/<n>/.hydra/{overrides,config}.yaml, metrics.json and frames.safetensors of every job and writes
compile_modes.md (table), compile_modes.csv and compile_modes.png (bars) into OUT (default: DIR).

Per job: compile seconds (first step − steady median, floored at 0), first / steady step latency, end-to-end
seconds (seconds.total), peak GPU memory, graph breaks, recompiles, max |Δ| and PSNR of the frames against the
reference job's frames, sha256, and the steady-step speed-up vs eager and vs `default`.

Reference ("eager") job of a row: the job with compile.mode == eager whose other swept overrides equal the
row's (so `-m seed=0,1 compile=eager,default` compares each seed with its own eager run); else the first eager
job; else the first job that finished. A job without metrics.json is reported as failed (with the ERROR line of
its log when there is one). Rows are labelled by the overrides that differ between jobs (e.g. "compile=cudagraph").
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

COLUMNS = [
    "job", "label", "status", "compile_mode", "compile_s", "first_step_s", "steady_step_s", "total_s",
    "peak_memory_gib", "graph_breaks", "recompiles", "unique_graphs", "warm_cache", "max_abs_diff", "psnr_db",
    "sha256", "speedup_vs_eager", "speedup_vs_default", "reference", "error",
]


@dataclass
class Job:
    num: int
    path: Path
    overrides: list[str]
    config: dict
    metrics: dict | None
    error: str = ""
    label: str = ""
    row: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.metrics is not None

    @property
    def mode(self) -> str | None:
        if self.metrics and isinstance(self.metrics.get("compile"), dict) and self.metrics["compile"].get("mode"):
            return str(self.metrics["compile"]["mode"])
        comp = self.config.get("compile")
        return str(comp["mode"]) if isinstance(comp, dict) and "mode" in comp else None


# ------------------------------------------------------------------------------------------------ reading


def _yaml(path: Path):
    if not path.is_file():
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def _log_error(job_dir: Path) -> str:
    for log in sorted(job_dir.glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "[ERROR]" in ln]
        if lines:
            return lines[-1].split("[ERROR] - ", 1)[-1].strip()
    return ""


def read_jobs(sweep: Path) -> list[Job]:
    jobs = []
    dirs = [d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit() and (d / ".hydra").is_dir()]
    for d in sorted(dirs, key=lambda d: int(d.name)):
        overrides = [str(o) for o in (_yaml(d / ".hydra" / "overrides.yaml") or [])]
        config = _yaml(d / ".hydra" / "config.yaml") or {}
        metrics = None
        error = ""
        if (d / "metrics.json").is_file():
            try:
                metrics = json.loads((d / "metrics.json").read_text())
            except json.JSONDecodeError as e:
                error = f"unreadable metrics.json: {e}"
        if metrics is None:
            error = error or _log_error(d) or "no metrics.json"
        if metrics is not None and not config:
            config = metrics.get("config") or {}
        jobs.append(Job(int(d.name), d, overrides, config, metrics, error))
    return jobs


def load_frames(job_dir: Path) -> np.ndarray | None:
    path = job_dir / "frames.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors.numpy import load_file

        return load_file(str(path))["frames"]
    except Exception:  # e.g. a dtype numpy lacks: go through torch
        from safetensors.torch import load_file as load_torch

        return load_torch(str(path))["frames"].float().numpy()


# ------------------------------------------------------------------------------------------------ labels


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def label_jobs(jobs: list[Job]) -> None:
    """Label = the overrides that differ between jobs (all overrides when there is one job)."""
    keys: dict[str, set] = {}
    for j in jobs:
        for o in j.overrides:
            keys.setdefault(_key(o), set()).add(o)
    present = [set(_key(o) for o in j.overrides) for j in jobs]
    varying = {k for k, vals in keys.items() if len(vals) > 1 or any(k not in p for p in present)}
    for j in jobs:
        parts = [o for o in j.overrides if _key(o) in varying] if len(jobs) > 1 else list(j.overrides)
        j.label = " ".join(parts) or f"job {j.num}"
    seen: dict[str, int] = {}
    for j in jobs:  # keep labels unique
        seen[j.label] = seen.get(j.label, 0) + 1
        if seen[j.label] > 1:
            j.label = f"{j.label} (job {j.num})"
    for j in jobs:
        j.row["_group"] = tuple(o for o in j.overrides if _key(o) in varying and not _key(o).startswith("compile"))


def _pick(jobs: list[Job], group, mode: str | None) -> Job | None:
    ok = [j for j in jobs if j.ok]
    cands = [j for j in ok if mode is None or j.mode == mode]
    same = [j for j in cands if j.row["_group"] == group]
    return (same or cands or [None])[0]


# ------------------------------------------------------------------------------------------------ metrics


def frame_diff(a: np.ndarray | None, b: np.ndarray | None) -> tuple[float | None, float | None]:
    """(max |a − b|, PSNR in dB) with peak 1.0 for float frames, 255 for integer ones; inf PSNR when identical."""
    if a is None or b is None or a.shape != b.shape:
        return None, None
    peak = 255.0 if np.issubdtype(a.dtype, np.integer) else 1.0
    d = a.astype(np.float64) - b.astype(np.float64)
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    mse = float(np.mean(d * d)) if d.size else 0.0
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)
    return max_abs, psnr


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def build_rows(jobs: list[Job]) -> list[dict]:
    label_jobs(jobs)
    frames_cache: dict[int, np.ndarray | None] = {}

    def frames(j: Job):
        if j.num not in frames_cache:
            frames_cache[j.num] = load_frames(j.path)
        return frames_cache[j.num]

    for j in jobs:
        r = j.row
        r.update({c: None for c in COLUMNS})
        r.update(job=j.num, label=j.label, compile_mode=j.mode, status="ok" if j.ok else "failed", error=j.error)
        if not j.ok:
            continue
        m = j.metrics
        steps = m.get("steps") or {}
        first, steady = _num(steps.get("first_s")), _num(steps.get("steady_median_s"))
        comp = m.get("compile") or {}
        r.update(
            first_step_s=first, steady_step_s=steady,
            compile_s=max(0.0, first - steady) if first is not None and steady is not None else None,
            total_s=_num((m.get("seconds") or {}).get("total")), peak_memory_gib=_num(m.get("peak_memory_gib")),
            graph_breaks=comp.get("graph_breaks"), recompiles=comp.get("recompiles"),
            unique_graphs=comp.get("unique_graphs"), warm_cache=comp.get("warm_cache"), sha256=m.get("sha256"),
        )
        ref = _pick(jobs, r["_group"], "eager") or _pick(jobs, r["_group"], None)
        r["reference"] = ref.label if ref is not None else None
        if ref is not None:
            r["max_abs_diff"], r["psnr_db"] = frame_diff(frames(j), frames(ref))
        for col, mode in (("speedup_vs_eager", "eager"), ("speedup_vs_default", "default")):
            base = _pick(jobs, r["_group"], mode)
            bs = base.row.get("steady_step_s") if base is not None else None
            if base is not None and bs is None:  # not filled yet: compute from its metrics
                bs = _num(((base.metrics or {}).get("steps") or {}).get("steady_median_s"))
            if bs is not None and steady:
                r[col] = bs / steady
    return [{c: j.row[c] for c in COLUMNS} for j in jobs]


# ------------------------------------------------------------------------------------------------ header


def _find(d, names: tuple[str, ...]):
    """First value under any of `names`, searching nested dicts breadth-first (metrics layout may grow)."""
    queue = [d]
    while queue:
        cur = queue.pop(0)
        if not isinstance(cur, dict):
            continue
        for n in names:
            if n in cur and cur[n] not in (None, "", {}):
                return cur[n]
        queue.extend(v for k, v in cur.items() if isinstance(v, dict) and k != "config")
    return None


def reconstruct_command(sweep: Path, jobs: list[Job]) -> tuple[str | None, str]:
    """The multirun command line: exact from multirun.yaml (hydra.overrides), else merged from the jobs."""
    mr = _yaml(sweep / "multirun.yaml")
    ov = ((mr or {}).get("hydra") or {}).get("overrides") if isinstance(mr, dict) else None
    if isinstance(ov, dict) and ov.get("task") is not None:
        hydra_ov = [str(o) for o in ov.get("hydra") or [] if str(o) != "hydra.mode=MULTIRUN"]
        task = [str(o) for o in ov["task"]]
        return "cosmos3-generate -m " + " ".join(shlex.quote(o) for o in task + hydra_ov), "multirun.yaml"
    if not jobs:
        return None, ""
    order: list[str] = []
    values: dict[str, list[str]] = {}
    for j in jobs:
        for o in j.overrides:
            k, _, v = o.partition("=")
            if k not in values:
                order.append(k)
                values[k] = []
            if v not in values[k]:
                values[k].append(v)
    parts = [f"{k}={','.join(values[k])}" for k in order] + [f"hydra.sweep.dir={sweep}"]
    return "cosmos3-generate -m " + " ".join(shlex.quote(p) for p in parts), "job overrides (reconstructed)"


def header(sweep: Path, jobs: list[Job]) -> list[str]:
    ok = [j for j in jobs if j.ok]
    # the resolved device (metrics.json) wins over the composed one, which may say `auto`
    devices = sorted({str((j.metrics or {}).get("config", {}).get("device") or j.config.get("device", "?")) for j in jobs})
    lines = ["# Compile-mode comparison", "", f"- sweep: `{sweep}`", f"- device: {', '.join(devices) or '?'}"]
    names = sorted({str(v) for j in ok if (v := _find(j.metrics, ("device_name", "gpu_name", "cuda_device_name", "gpu")))})
    if names:
        lines[-1] += f" ({', '.join(names)})"
    torch_v = sorted({str(v) for j in ok if (v := _find(j.metrics, ("torch_version", "torch")))})
    if torch_v:
        lines.append(f"- torch: {', '.join(torch_v)}")
    dtypes = sorted({str(j.config.get("dtype")) for j in jobs if j.config.get("dtype")})
    if dtypes:
        lines.append(f"- dtype: {', '.join(dtypes)}")
    cmd, src = reconstruct_command(sweep, jobs)
    if cmd:
        lines += [f"- command ({src}):", "", "```", cmd, "```"]
    lines += ["", f"{len(ok)} of {len(jobs)} jobs finished. Frames compared against the eager job of the same "
              "sweep point (PSNR peak 1.0 for float frames, 255 for uint8; inf = identical). "
              "Compile s = first step − steady median (≥ 0). Speed-up = reference steady step / this steady step.", ""]
    return lines


# ------------------------------------------------------------------------------------------------ writing


def _fmt(v, digits=4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v == 0:
            return "0"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


MD_COLUMNS = [
    ("label", "job"), ("status", "status"), ("compile_s", "compile s"), ("first_step_s", "first step s"),
    ("steady_step_s", "steady step s"), ("total_s", "end-to-end s"), ("peak_memory_gib", "peak mem GiB"),
    ("graph_breaks", "graph breaks"), ("recompiles", "recompiles"), ("max_abs_diff", "max abs Δ"),
    ("psnr_db", "PSNR dB"), ("speedup_vs_eager", "× vs eager"), ("speedup_vs_default", "× vs default"),
    ("sha256", "sha256"),
]


def write_markdown(path: Path, head: list[str], rows: list[dict]) -> None:
    out = list(head)
    out.append("| " + " | ".join(h for _, h in MD_COLUMNS) + " |")
    out.append("|" + "|".join("---" if c in ("label", "status", "sha256") else "---:" for c, _ in MD_COLUMNS) + "|")
    for r in rows:
        cells = []
        for c, _ in MD_COLUMNS:
            v = r[c]
            if c == "status" and v == "failed" and r["error"]:
                v = f"failed: {r['error']}"
            elif c == "sha256" and v:
                v = f"`{v[:12]}`"
            elif c == "label":
                v = f"`{v}`"
            cells.append(_fmt(v).replace("|", "\\|").replace("\n", " "))
        out.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(out) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r[c] is None else ("inf" if isinstance(r[c], float) and math.isinf(r[c]) else r[c]))
                        for c in COLUMNS})


def write_png(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] + ("\n(failed)" if r["status"] != "ok" else "") for r in rows]
    panels = [("steady_step_s", "steady step (s)"), ("total_s", "end-to-end (s)"), ("compile_s", "compile (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 1.6 * len(rows) * 3), 4.2), squeeze=False)
    x = np.arange(len(rows))
    for ax, (col, name) in zip(axes[0], panels):
        vals = [r[col] if r[col] is not None else 0.0 for r in rows]
        colors = ["tab:gray" if r["status"] != "ok" else ("tab:blue" if r["compile_mode"] == "eager" else "tab:orange")
                  for r in rows]
        bars = ax.bar(x, vals, color=colors)
        for b, r in zip(bars, rows):
            if r[col] is not None:
                ax.annotate(_fmt(r[col], 3), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8)
        ax.set_title(name)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Tabulate and plot a cosmos3-generate multirun over compile modes "
                    "(compile_modes.md / .csv / .png).",
        epilog="example: cosmos3-generate -m compile=eager,default,cudagraph output.frames=float32 "
               "hydra.sweep.dir=DIR && python tools/compare_compile_modes.py DIR",
    )
    p.add_argument("sweep_dir", type=Path, help="Hydra multirun directory (hydra.sweep.dir) with one <n>/ per job")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the multirun directory)")
    p.add_argument("--no-png", action="store_true", help="skip the matplotlib figure")
    args = p.parse_args(argv)

    sweep = args.sweep_dir
    if not sweep.is_dir():
        p.error(f"not a directory: {sweep}")
    jobs = read_jobs(sweep)
    if not jobs:
        p.error(f"no Hydra jobs (<n>/.hydra/) under {sweep}")
    rows = build_rows(jobs)
    out = args.out or sweep
    out.mkdir(parents=True, exist_ok=True)
    head = header(sweep, jobs)
    write_markdown(out / "compile_modes.md", head, rows)
    write_csv(out / "compile_modes.csv", rows)
    written = [out / "compile_modes.md", out / "compile_modes.csv"]
    if not args.no_png:
        dev = head[3].removeprefix("- ")
        write_png(out / "compile_modes.png", rows, f"{sweep.name}: {dev}")
        written.append(out / "compile_modes.png")
    print((out / "compile_modes.md").read_text())
    for w in written:
        print(f"wrote {w}")
    failed = [r["label"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} failed job(s): {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
