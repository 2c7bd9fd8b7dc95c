"""Parsing and printing of sizes, fractions and durations.

Sizes in scenario files may be plain integers (bytes) or strings with a binary or
decimal unit ("64KiB", "2GiB", "80GB"); budgets may also be a percentage of a
workload's working set ("20%"). Everything inside Synapse is in bytes and seconds.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MAX_BYTES = 2**60  # 1 EiB: sizes beyond are typos (a machine with more memory does not exist)
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Return a byte count from an int or a string such as ``"2GiB"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite size, got {value!r}")
    if isinstance(value, (int, float)):
        if value != int(value):
            raise ValueError(f"expected a whole number of bytes, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 4096, '64KiB' or '2GiB', got {value!r}")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n):
        raise ValueError(f"expected a finite size, got {value!r}")
    return int(round(n))


def parse_budget(value: int | float | str, whole_bytes: int | None) -> int:
    """A size, or a percentage ("20%") of ``whole_bytes`` (the workload's working set)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        pct = float(value.strip()[:-1])
        if whole_bytes is None:
            raise ValueError(f"a percentage budget ({value!r}) needs a workload with a known size")
        return int(whole_bytes * pct / 100.0)
    return parse_bytes(value)


def fmt_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
