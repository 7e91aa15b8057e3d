"""The one progress-bar helper every stage uses: shown on global rank 0 only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .distributed import rank

T = TypeVar("T")

_enabled = True


def set_progress_enabled(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (config `output.progress`)."""
    global _enabled
    _enabled = bool(enabled)


def progress(iterable: Iterable[T], desc: str | None, total: int | None = None) -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar when enabled and on global rank 0; a plain iterator otherwise, and for
    `desc=None` (work nobody waits on, such as a background warm-up)."""
    if desc is None or not _enabled or rank() != 0:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
