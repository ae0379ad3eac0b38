"""Peak resident memory of a block of work, read from Linux's /proc (no sampling, nothing missed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@contextmanager
def peak_memory() -> Iterator[dict[str, float | None]]:
    """Measure how far the process's resident memory rose above its level at entry.

    Yields a dict whose ``"peak_mb"`` is set on exit: the peak resident set (VmHWM, reset at entry by
    writing 5 to /proc/self/clear_refs) minus the resident set at entry, in MiB; None where /proc does
    not offer that (not Linux). It counts everything the process allocated, PyTorch's buffers included.
    Memory freed earlier is first handed back to the system (glibc's malloc_trim), so that reusing it
    counts as growth too.
    """
    result: dict[str, float | None] = {"peak_mb": None}
    gc.collect()
    _trim_heap()
    try:
        _CLEAR_REFS.write_text("5")
        start = _read_kib("VmRSS")
    except OSError:
        start = None
    yield result
    if start is not None:
        result["peak_mb"] = max(0, _read_kib("VmHWM") - start) / 1024


def _read_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _trim_heap() -> None:
    library = ctypes.util.find_library("c")
    if library is None:
        return
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
    if trim is not None:
        trim(0)
