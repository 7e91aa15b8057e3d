"""Host-side probe on the lent GPU machine (results in docs/benchmarks/cosmos3_nano_h100_20261126.md §4):
host-to-device bandwidth pageable vs pinned, the cost of page-locking 4 GiB three ways
(pin_memory per tensor, one pinned allocation, cudaHostRegister in place), and libx264 (crf 18) encode time
of 81 frames at 1280x720 for noise and for a smooth synthetic video, slice vs frame threading.

    python tools/probe_host.py
"""
import time, torch, av, numpy as np, io, os
from fractions import Fraction
def t(): torch.cuda.synchronize(); return time.perf_counter()
print("cpus", os.cpu_count(), "torch", torch.__version__, "av", av.__version__)
# 1. H2D bandwidth
n = 512 * 2**20
pg = torch.empty(n, dtype=torch.uint8); pg.fill_(1)
pn = torch.empty(n, dtype=torch.uint8, pin_memory=True); pn.fill_(1)
d = torch.empty(n, dtype=torch.uint8, device="cuda")
for name, src in (("pageable", pg), ("pinned", pn)):
    d.copy_(src, non_blocking=True); t0 = t()
    for _ in range(5): d.copy_(src, non_blocking=True)
    print(f"H2D {name}: {5*n/(t()-t0)/1e9:.1f} GB/s")
del pg, pn
# 2. pin cost, 4 GB in 100 params
sizes = [40 * 2**20] * 100
ps = [torch.empty(s, dtype=torch.uint8).fill_(2) for s in sizes]
t0 = time.perf_counter(); pp = [p.pin_memory() for p in ps]; print(f"pin per-tensor 4 GiB: {time.perf_counter()-t0:.2f} s"); del pp
t0 = time.perf_counter(); flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True); t1 = time.perf_counter()
off = 0
for p in ps: flat[off:off+p.numel()].copy_(p); off += p.numel()
print(f"pin flat 4 GiB: alloc {t1-t0:.2f} s + copy {time.perf_counter()-t1:.2f} s"); del flat
t0 = time.perf_counter()
big = torch.empty(sum(sizes), dtype=torch.uint8).fill_(3); t1 = time.perf_counter()
r = torch.cuda.cudart().cudaHostRegister(big.data_ptr(), big.numel(), 0); print(f"cudaHostRegister 4 GiB: {time.perf_counter()-t1:.2f} s rc={r}")
# 3. encode
F, H, W = 81, 720, 1280
g = torch.Generator().manual_seed(0)
noise = torch.randint(0, 256, (F, H, W, 3), dtype=torch.uint8, generator=g).numpy()
yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
smooth = np.stack([np.stack([(xx + 3 * f) % 256, (yy + 2 * f) % 256, (xx + yy) // 8 % 256], -1).astype(np.uint8) for f in range(F)])
def enc(arr, threads=None, ttype=None, preset=None):
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(24))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        opts = {"crf": "18"}
        if preset: opts["preset"] = preset
        s.options = opts
        if threads is not None: s.codec_context.thread_count = threads
        if ttype: s.codec_context.thread_type = ttype
        for i in range(F):
            for p in s.encode(av.VideoFrame.from_ndarray(arr[i], format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)
    return time.perf_counter() - t0, buf.tell()
t0 = time.perf_counter()
for i in range(F): av.VideoFrame.from_ndarray(noise[i], format="rgb24").reformat(format="yuv420p")
print(f"rgb->yuv only: {time.perf_counter()-t0:.2f} s")
for name, arr in (("noise", noise), ("smooth", smooth)):
    for kw in ({}, {"threads": 0}, {"threads": 16}, {"threads": 0, "ttype": "FRAME"}, {"preset": "fast"}):
        s, b = enc(arr, **kw); print(f"encode {name} {kw}: {s:.2f} s, {b/1e6:.1f} MB")
