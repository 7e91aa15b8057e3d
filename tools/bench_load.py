#!/usr/bin/env python3
"""Checkpoint read speed: a transformer folder streamed to the GPU (`checkpoint_io.stream_tensors`, the loader's own
path: pinned ring, non-blocking copies) with 1..N reader threads, alternating, so the page cache is in the same
state for each (the first pass warms it when the files are not cached yet; that pass is reported apart).

GPU: python tools/bench_load.py /tmp/cosmos3-nano/transformer --readers 1,2,4,8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a transformer/ folder of an official-layout checkpoint")
    ap.add_argument("--readers", default="1,4", help="comma list of reader-thread counts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    from cosmos3_compiled import checkpoint_io as cio

    header = cio.read_header(cio.weight_files(args.folder))
    dev = torch.device(args.device)
    targets = {k: (dev, e.dtype) for k, e in header.items()}
    nbytes = sum(e.nbytes for e in header.values())

    def once(readers: int) -> float:
        cio._READERS = readers
        t0 = time.perf_counter()
        out = cio.stream_tensors(header, targets)
        seconds = time.perf_counter() - t0
        del out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return seconds

    counts = [int(x) for x in args.readers.split(",")]
    first = once(counts[0])
    print(f"first pass ({counts[0]} reader(s)): {first:.2f} s, {nbytes / first / 1e9:.2f} GB/s")
    runs: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n in counts:
            runs[n].append(once(n))
    result = {"bytes": nbytes, "first_pass_s": first, "chunk_bytes": cio._CHUNK_BYTES, "slots": cio._SLOTS,
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "readers": {}}
    print("| readers | median s | GB/s |\n|---|---|---|")
    for n, secs in runs.items():
        med = statistics.median(secs)
        result["readers"][n] = {"seconds": secs, "median_s": med, "gb_per_s": nbytes / med / 1e9}
        print(f"| {n} | {med:.2f} | {nbytes / med / 1e9:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
