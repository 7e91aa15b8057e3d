"""The one progress-bar helper every stage uses: shown on global rank 0 only."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def set_progress_enabled(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (config `output.progress`)."""
    global _enabled
    _enabled = bool(enabled)


def global_rank() -> int:
    """Rank of this process among all processes of the job (0 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # torchrun sets RANK before init_process_group; honour it so bars stay quiet even that early.
    return int(os.environ.get("RANK", "0"))


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar when enabled and on global rank 0; a plain iterator otherwise."""
    if not _enabled or global_rank() != 0:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
