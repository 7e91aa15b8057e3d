"""Safetensors-only reading of official (diffusers-layout) component folders, and strict assignment.

Loading goes header first: every shard's keys, shapes and dtypes are read (`read_header`) and checked against
the model (`check_strict`) before any tensor data is touched, so a mismatched checkpoint fails in one message
without loading. Then `stream_tensors` reads the data. On CPU targets the tensors stay the safetensors memory
maps (cast only where the dtype differs). Towards a CUDA device the bytes go file → a small ring of pinned host
buffers → device with non-blocking copies, background threads reading the next chunks while earlier ones are
copied, so the host never holds more than the ring (plus the tensors meant to live in host memory).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import RequestError
from .offload import PinnedHostBuffers

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype names (`get_slice(k).get_dtype()`) → torch
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# the pinned staging ring towards a CUDA device: _SLOTS buffers of _CHUNK_BYTES each, filled by _READERS threads
_CHUNK_BYTES = 32 << 20
_SLOTS = 12
_READERS = 8


CheckpointError = RequestError  # the one user-error type (errors.py)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}: expected a diffusers-layout component folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _raw_header(path: Path) -> tuple[dict, int]:
    """The safetensors header as JSON and where the data section starts, checked cheaply (8-byte length + JSON)
    so corruption fails before any load."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or 8 + n > size:
            raise CheckpointError(f"{path} has a corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header")
    return header, 8 + n


def _check_header(path: Path) -> None:
    _raw_header(path)


def weight_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of one component: a single file, or the shards named by `<stem>.safetensors.index.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing checkpoint subfolder {folder}")
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in {index.name} are missing: {', '.join(missing)}")
    elif single.is_file():
        files = [single]
    else:
        pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); refusing to unpickle. "
                "Convert them to safetensors first."
            )
        raise CheckpointError(f"{folder} has no {single.name} or {index.name}")
    for f in files:
        _check_header(f)
    return files


# ---------------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it: where its bytes are, its shape and dtype."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_header(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of `files` from the safetensors headers alone (no tensor data is read), in file order.

    Keys, shapes and dtypes come from `safe_open` (which validates the header against the file size); the
    byte offsets from the raw header, for sequential reads. A key in two shards is an error.
    """
    out: dict[str, TensorEntry] = {}
    for path in files:
        raw, data_start = _raw_header(Path(path))
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                described = {}
                for k in f.keys():
                    piece = f.get_slice(k)
                    described[k] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as err:  # safetensors raises its own error types for inconsistent headers
            raise CheckpointError(f"cannot read {path}: {err}") from None
        entries = []
        for key, (shape, name) in described.items():
            if key in out:
                raise CheckpointError(f"tensor {key!r} appears in more than one shard ({Path(path).name})")
            if name not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which this loader does not read")
            begin, end = raw[key]["data_offsets"]
            entries.append((begin, key, TensorEntry(Path(path), shape, _DTYPES[name], data_start + begin, end - begin)))
        for _, key, entry in sorted(entries, key=lambda e: e[0]):
            out[key] = entry
    return out


def check_strict(
    module: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], ignore: frozenset[str] = frozenset(),
    where: str = "checkpoint",
) -> None:
    """Every parameter and persistent buffer of `module` must be in `shapes` with its shape; keys in `ignore`
    may be present; anything else is an error. All problems are reported at once."""
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(ignore))
    mismatched = [
        f"{k}: file {tuple(shapes[k])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{where} does not match the model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:20]))
        raise CheckpointError("\n".join(lines))


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SCALES = (".weight_scale", ".input_scale")  # an FP8 linear's per-tensor scales (fp8.Fp8Linear)


def _target_dtype(key: str, file_dtype: torch.dtype, dtype: torch.dtype | None, keep_fp32: tuple[str, ...]):
    """The dtype a tensor lives in: integers and FP8 weights as stored, FP8 scales and `keep_fp32` in float32,
    other floating tensors in `dtype` (None: as stored)."""
    if not file_dtype.is_floating_point or file_dtype in _FP8_DTYPES:
        return file_dtype
    if key.endswith(_FP8_SCALES):
        return torch.float32
    return torch.float32 if key.startswith(keep_fp32) else (dtype or file_dtype)


# ---------------------------------------------------------------------------------------------------- data


def stream_tensors(
    header: Mapping[str, TensorEntry],
    targets: Mapping[str, tuple[torch.device, torch.dtype]],
    stats: dict | None = None,
    staged: bool | None = None,
    host_out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors named in `targets` (key → (device, dtype)), each cast on its device only where the
    file's dtype differs. `host_out`: for some host targets, the tensor to read into (of the target's shape and
    dtype, e.g. a page-locked buffer's view); it is what the result holds for that key.

    `staged` (default: whenever a target is a CUDA device): read through the pinned ring in a background thread
    (`_Stager`); otherwise take the safetensors memory maps as they are. `stats` gets `bytes` (tensor data
    read, file dtype) and `seconds` (wall time of the reads and copies, devices synchronized).
    """
    targets = {k: (torch.device(d), t) for k, (d, t) in targets.items()}
    devices = {d for d, _ in targets.values()}
    if staged is None:
        staged = any(d.type == "cuda" for d in devices)
    t0 = time.perf_counter()
    keys = [k for k in header if k in targets]  # file order
    if staged:
        out = _Stager(header, keys, targets, host_out=host_out).run()
    else:
        out = _read_mapped(header, keys, targets, host_out)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    if stats is not None:
        stats["bytes"] = sum(header[k].nbytes for k in keys)
        stats["seconds"] = time.perf_counter() - t0
        stats["path"] = "stream" if staged else "mmap"
    return out


def _read_mapped(header, keys, targets, host_out=None) -> dict[str, torch.Tensor]:
    """Safetensors memory maps, one shard open at a time: no copy unless a dtype or device differs."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(header[k].path, []).append(k)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in names:
                    dev, dt = targets[k]
                    out[k] = _into(host_out, k, f.get_tensor(k).to(device=dev, dtype=dt))
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated data
            raise CheckpointError(f"cannot read {path}: {err}") from None
    return out


def _into(host_out, k: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, or `host_out[k]` filled with it where the caller gave one."""
    dst = host_out.get(k) if host_out else None
    if dst is None:
        return t
    dst.copy_(t)
    return dst


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"cannot read {path}: file ends inside the tensor data (offset {offset + done})")
        done += n


class _Stager:
    """file → pinned ring → device. `_READERS` reader threads share the work list (every ring tensor cut into
    chunks of at most `_CHUNK_BYTES`, in file order): each takes the next chunk, waits for a free ring slot,
    fills it with one os.preadv and hands it over; the caller's thread queues the slot's non-blocking copy into
    the tensor's device buffer on the current CUDA stream and records an event, and the slot is refilled only
    after that event. Several reads in flight keep a page-cache copy or a deep disk queue busy where one thread
    would wait on each read in turn. Tensors meant for host memory are read straight into their own (unpinned)
    tensors by a reader (or into the caller's `host_out` tensor for that key, when its dtype is the file's). The
    result keeps the file order of `keys`."""

    def __init__(self, header, keys, targets, ring: frozenset[str] | None = None, host_out=None):
        """`ring`: the keys that go through the ring (default: those whose target is not the CPU)."""
        self.header, self.keys, self.targets = header, keys, targets
        self.host_out = host_out or {}
        self.ring = frozenset(k for k in keys if targets[k][0].type != "cpu") if ring is None else ring
        cuda = any(targets[k][0].type == "cuda" for k in keys)
        staged_bytes = sum(header[k].nbytes for k in keys if k in self.ring)
        n = min(_SLOTS, max(1, -(-staged_bytes // _CHUNK_BYTES)))
        size = min(_CHUNK_BYTES, max(1, staged_bytes))
        self.slots = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(n)] if staged_bytes else []
        self.events: list = [None] * len(self.slots)
        self.free: queue.Queue = queue.Queue()
        for i in range(len(self.slots)):
            self.free.put(i)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for k in keys:
            if k not in self.ring:
                self.jobs.put((k, 0, 0))
            else:
                for a in range(0, header[k].nbytes, _CHUNK_BYTES):
                    self.jobs.put((k, a, min(header[k].nbytes, a + _CHUNK_BYTES)))
        self.readers = min(_READERS, len(self.slots)) or 1  # host-only reads: one reader
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    # ---- reader threads
    def _take_slot(self) -> int | None:
        while not self.stop.is_set():
            try:
                i = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            if self.events[i] is not None:
                self.events[i].synchronize()
            return i
        return None

    def _read(self) -> None:
        fds: dict[Path, int] = {}
        try:
            while not self.stop.is_set():
                try:
                    k, a, b = self.jobs.get_nowait()
                except queue.Empty:
                    return
                e = self.header[k]
                if e.path not in fds:
                    fds[e.path] = os.open(e.path, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):  # read in file order: let the kernel read ahead further
                        os.posix_fadvise(fds[e.path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
                fd = fds[e.path]
                if k not in self.ring:
                    dev, dt = self.targets[k]
                    dst = self.host_out.get(k)
                    direct = dst is not None and dst.dtype == e.dtype  # no cast: the file's bytes go straight in
                    t = dst if direct else torch.empty(e.shape, dtype=e.dtype)
                    if e.nbytes:
                        _pread_into(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), e.start, e.path)
                    self.ready.put(("host", k, t if direct else _into(self.host_out, k, t.to(device=dev, dtype=dt))))
                    continue
                i = self._take_slot()
                if i is None:
                    return
                _pread_into(fd, memoryview(self.slots[i].numpy())[: b - a], e.start + a, e.path)
                self.ready.put(("chunk", k, (a, b, i)))
        except BaseException as err:  # handed to the caller's thread
            self.stop.set()
            self.ready.put(("error", None, err))
        finally:
            for fd in fds.values():
                os.close(fd)
            self.ready.put(("done", None, None))

    # ---- caller's thread
    def _device_buffer(self, k: str) -> torch.Tensor:
        e = self.header[k]
        return torch.empty(e.shape, dtype=e.dtype, device=self.targets[k][0])

    def _finish(self, k: str, dst: torch.Tensor) -> torch.Tensor:
        """cast on the device only where the dtype differs"""
        dt = self.targets[k][1]
        return dst if dt == self.header[k].dtype else dst.to(dt)

    def run(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k in self.keys:  # ring tensors without bytes get no chunk
            if k in self.ring and not self.header[k].nbytes:
                out[k] = self._finish(k, self._device_buffer(k))
        filling: dict[str, list] = {}  # key → [device buffer, its bytes view, bytes still to come]
        with ThreadPoolExecutor(self.readers, thread_name_prefix="checkpoint-read") as pool:
            readers = [pool.submit(self._read) for _ in range(self.readers)]
            running = self.readers
            try:
                while running:
                    kind, k, payload = self.ready.get()
                    if kind == "done":
                        running -= 1
                    elif kind == "error":
                        if isinstance(payload, CheckpointError):
                            raise payload
                        if isinstance(payload, OSError):
                            raise CheckpointError(f"cannot read {payload.filename or 'checkpoint'}: {payload}") from None
                        raise payload
                    elif kind == "host":
                        out[k] = payload
                    else:  # a chunk of a ring tensor
                        a, b, i = payload
                        if k not in filling:
                            dst = self._device_buffer(k)
                            filling[k] = [dst, dst.reshape(-1).view(torch.uint8), self.header[k].nbytes]
                        entry = filling[k]
                        entry[1][a:b].copy_(self.slots[i][: b - a], non_blocking=True)
                        dev = entry[0].device
                        if dev.type == "cuda":
                            ev = torch.cuda.Event()
                            ev.record(torch.cuda.current_stream(dev))
                            self.events[i] = ev
                        self.free.put(i)
                        entry[2] -= b - a
                        if entry[2] == 0:
                            out[k] = self._finish(k, entry[0])
                            del filling[k]
            finally:
                self.stop.set()
                for r in readers:
                    r.result()
        return {k: out[k] for k in self.keys}


def load_tensors(files: list[Path], device: str | torch.device = "cpu", stats: dict | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of `files` (safetensors only) onto `device`, in the file's dtypes."""
    header = read_header(files)
    dev = torch.device(device)
    return stream_tensors(header, {k: (dev, e.dtype) for k, e in header.items()}, stats)


def load_strict(
    module: torch.nn.Module,
    files: list[Path],
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    *,
    ignore: frozenset[str] = frozenset(),
    keep_fp32: tuple[str, ...] = (),
    where: str = "checkpoint",
    host: Callable[[str], bool] | None = None,
    header: Mapping[str, TensorEntry] | None = None,
    stats: dict | None = None,
    pin_host: bool = False,
):
    """Check `files` against `module` (built on the meta device) from the headers, then stream the weights
    straight to where they live and assign them (no second copy).

    Casting as in `assign_strict`; keys for which `host(key)` is true are kept in host memory; keys in
    `ignore` are never read. `pin_host` (a CUDA `device`): the host keys are read straight into page-locked
    buffers (`offload.PinnedHostBuffers`), returned so the caller keeps them as long as the module; otherwise
    returns None.
    """
    header = read_header(files) if header is None else header
    check_strict(module, {k: e.shape for k, e in header.items()}, ignore, where)
    dev, cpu = torch.device(device), torch.device("cpu")
    targets = {
        k: (cpu if host is not None and host(k) else dev, _target_dtype(k, header[k].dtype, dtype, keep_fp32))
        for k in module.state_dict(keep_vars=True)
    }
    pinned = None
    if pin_host and dev.type == "cuda":
        on_host = {k: (header[k].shape, dt) for k, (d, dt) in targets.items() if d.type == "cpu"}
        pinned = PinnedHostBuffers(on_host) if on_host else None
    state = stream_tensors(header, targets, stats, host_out=pinned.views if pinned is not None else None)
    module.load_state_dict(state, strict=True, assign=True)
    return pinned


def assign_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    ignore: frozenset[str] = frozenset(),
    keep_fp32: tuple[str, ...] = (),
    where: str = "checkpoint",
) -> None:
    """Assign `state` into `module` (built on the meta device) without copying twice.

    Every parameter and persistent buffer must be present with the right shape; keys in `ignore`
    may be present and are dropped; anything else is an error. All problems are reported at once.
    Tensors are cast to `dtype` (None keeps the file's dtype) except names starting with `keep_fp32`.
    """
    check_strict(module, {k: tuple(v.shape) for k, v in state.items()}, ignore, where)
    cast = {}
    for k in module.state_dict(keep_vars=True):
        t = state[k]
        cast[k] = t.to(_target_dtype(k, t.dtype, dtype, keep_fp32))
    module.load_state_dict(cast, strict=True, assign=True)
