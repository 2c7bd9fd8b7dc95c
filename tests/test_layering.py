"""Layering rules of the code base, checked on the source: who may import whom, and that
the tier manager is the only door to the page table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "synapse"


def imports_of(path: Path) -> set[str]:
    """Absolute names of every synapse module ``path`` imports (at any depth)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("synapse")}


def modules(sub: str):
    return sorted((ROOT / sub).rglob("*.py"))


def offenders(sub: str, forbidden: str) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in modules(sub)
            for m in sorted(imports_of(p)) if m == forbidden or m.startswith(forbidden + ".")]


def test_the_hardware_layer_does_not_import_the_simulator():
    assert offenders("hw", "synapse.sim") == []


def test_the_kv_engine_does_not_import_the_simulator_or_the_drivers():
    assert offenders("kv", "synapse.sim") == []
    assert offenders("kv", "synapse.drivers") == []


def test_the_scenario_drivers_do_not_import_the_transformers_integration():
    assert offenders("drivers", "synapse.hf") == []


def test_the_policies_import_no_backend():
    bad = [o for sub in ("synapse.sim", "synapse.hw", "synapse.kv", "synapse.drivers")
           for o in offenders("policy", sub)]
    assert bad == []


# Outside the manager (and the page table itself), nothing writes a page-table column,
# reaches a manager's or policy's privates, or counts hits by hand.
PRIVATE = [
    (re.compile(r"\btable\.\w+\[[^\]]*\]\s*[-+]?=(?!=)"), "writes a page-table column"),
    (re.compile(r"\btable\.handle\["), "reads a page-table handle"),
    (re.compile(r"\b(mgr|manager)\._\w+"), "uses a manager private"),
    (re.compile(r"\b(mgr|manager)\.policy\.on_\w+"), "calls the policy behind the manager"),
    (re.compile(r"\b(mgr|manager)\.counters\.\w+\s*[-+]?="), "writes the manager's counters"),
    (re.compile(r"\.num_denied\s*[-+]?="), "bumps an allocator counter"),
]


def test_only_the_manager_touches_the_page_table_and_its_counters():
    allowed = {"manager.py", "page_table.py"}
    found = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        if p.name in allowed or rel.startswith(("policy/", "hw/slab.py", "kv/slots.py")):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for pat, what in PRIVATE:
                if pat.search(line):
                    found.append(f"{rel}:{i} {what}: {line.strip()}")
    assert found == []
