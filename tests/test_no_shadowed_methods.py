"""No instance attribute assigned in a class of ``synapse`` shares its name with one of
that class's methods: ``CudaBackend.l1_arena`` was once both a string set in
``__init__`` and a method, and every cuda driver step failed with "'str' object is not
callable" while the CPU suite, which never builds a ``CudaBackend``, stayed green. This
reads the source (AST), so it holds for classes the CPU cannot instantiate."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "synapse"


def shadowed(tree: ast.Module):
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        methods = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        props = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)
                 and any(getattr(d, "id", getattr(d, "attr", None)) in ("property", "setter")
                         for d in f.decorator_list)}
        for fn in (f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                for t in targets:
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                            and t.value.id == "self" and t.attr in methods - props):
                        yield f"{cls.name}.{t.attr} (line {node.lineno})"


def test_no_instance_attribute_shadows_a_method_of_its_class():
    found = [f"{p.relative_to(ROOT.parent)}: {hit}" for p in sorted(ROOT.rglob("*.py"))
             for hit in shadowed(ast.parse(p.read_text(), str(p)))]
    assert not found, "attributes that hide a method: " + "; ".join(found)


def test_the_check_finds_a_shadowed_method():
    src = "class B:\n    def __init__(self):\n        self.arena = 'x'\n    def arena(self):\n        return 1\n"
    assert list(shadowed(ast.parse(src))) == ["B.arena (line 3)"]
