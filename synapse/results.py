"""Reading what runs, sweeps and comparisons leave on disk.

``compare`` and ``dashboard`` take files as their only input (a run folder's
``result.json``, ``decisions.jsonl`` and ``ops.json``; a sweep folder's ``sweep.json`` and
``sweep.jsonl``; a comparison's ``compare.json``), so a result can be plotted or compared
on another machine, months later, without rerunning anything. Everything here refuses a
missing or damaged file with one ``ResultsError`` line; what writes them goes through
``synapse.outputs.atomic_write``, so an interrupted command never leaves half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import SynapseError
from .runner import DECISIONS_FILE, OPS_FILE, RESULT_FILE

SWEEP_MANIFEST = "sweep.json"
SWEEP_JSONL = "sweep.jsonl"
SWEEP_CSV = "sweep.csv"
COMPARE_FILE = "compare.json"


class ResultsError(SynapseError):
    """A result, sweep or comparison folder is missing, empty, damaged or of the wrong kind."""


@dataclass
class RunFiles:
    """One run as written by ``write_result``: its folder and the three files' contents."""

    path: Path
    result: dict
    decisions: list[dict] | None  # None: the folder has no decisions.jsonl
    ops: dict | None

    @property
    def metrics(self) -> dict:
        return self.result.get("metrics", {})

    @property
    def label(self) -> str:
        return f"{self.result.get('backend', '?')} ({self.path})"


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def run_dir(path: str | Path) -> Path:
    """A run folder from a folder or a ``result.json`` path."""
    p = Path(path)
    if p.is_file() and p.name == RESULT_FILE:
        return p.parent
    if p.is_dir() and (p / RESULT_FILE).is_file():
        return p
    if not p.exists():
        raise ResultsError(f"{p}: no such file or folder")
    raise ResultsError(f"{p}: not a run result (no {RESULT_FILE})")


def load_run(path: str | Path, with_ops: bool = True) -> RunFiles:
    d = run_dir(path)
    result = read_json(d / RESULT_FILE)
    if not isinstance(result, dict) or "metrics" not in result or "config" not in result:
        raise ResultsError(f"{d / RESULT_FILE}: not a synapse result (no metrics or config)")
    decisions = read_jsonl(d / DECISIONS_FILE) if (d / DECISIONS_FILE).exists() else None
    ops = None
    if with_ops and (d / OPS_FILE).exists():
        ops = read_json(d / OPS_FILE)
    return RunFiles(d, result, decisions, ops)


def folder_kind(path: Path) -> str | None:
    """``compare``, ``sweep`` or ``run`` for a folder holding that kind of result, else None."""
    if path.is_file():
        return {COMPARE_FILE: "compare", SWEEP_MANIFEST: "sweep", RESULT_FILE: "run"}.get(path.name)
    if (path / COMPARE_FILE).is_file():
        return "compare"
    if (path / SWEEP_MANIFEST).is_file():
        return "sweep"
    if (path / RESULT_FILE).is_file():
        return "run"
    return None
