"""The one error type for anything the user can fix: a bad request, setting, checkpoint or launch layout.

Every check raises `RequestError` with one line (what was wrong, the value seen, what to do), before any weights
are read; the entry point prints that line and exits 2.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request, setting, checkpoint or launch layout that cannot run, said in one line."""
