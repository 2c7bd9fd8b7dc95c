"""Strict loading of frozen-dataclass trees from YAML, with layered overrides.

Layers: the dataclass defaults, then the YAML file, then ``--set key.path=value``
overrides (values parsed as YAML scalars). Unknown keys, missing fields, wrong types,
non-finite numbers and values a field's check rejects all raise ``ScenarioError`` with one
line naming the file, the YAML path of the field, the bad value and what was expected (and
why, for a bound), plus a did-you-mean for unknown keys. A file that is not UTF-8, is not
YAML, or nests deeper or holds more values than any scenario needs is refused the same
way, before anything recurses over it. ``to_dict`` gives back the resolved tree, which is
saved with every result.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import ScenarioError

Check = Callable[[Any], "str | None"]  # returns what was expected, or None if fine


# A scenario nests a handful of levels (workload.tenants[0].name is four) and holds a few
# hundred values; anything far beyond is a mistake or an attack (YAML aliases expand).
MAX_DEPTH = 16
MAX_VALUES = 100_000
MAX_FILE_BYTES = 16 << 20  # and a few KiB on disk (a path to /dev/zero must not read for ever)


def checked(default: Any = dataclasses.MISSING, check: Check | None = None, doc: str = "",
            why: str = "", **kw) -> Any:
    """A dataclass field with a value check, a one-line description and, for a bound, the
    reason for it (``why``), which the error for a value outside it repeats."""
    md = {"check": check, "doc": doc, "why": why}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


# -- common checks ----------------------------------------------------------------------
def positive(v):
    return None if v > 0 else "a value > 0"


def non_negative(v):
    return None if v >= 0 else "a value >= 0"


def fraction(v):
    return None if 0.0 <= v <= 1.0 else "a fraction within [0, 1]"


def one_of(*names) -> Check:
    def check(v):
        return None if v in names else f"one of {', '.join(map(str, names))}"
    return check


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def within(lo, hi, lo_open: bool = False) -> Check:
    """``lo <= v <= hi`` (``lo < v`` with ``lo_open``)."""
    left = "(" if lo_open else "["
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and v <= hi
        return None if ok else f"a value within {left}{_num(lo)}, {_num(hi)}]"
    return check


def size_check(v):
    from .units import MAX_BYTES, parse_bytes
    try:
        n = parse_bytes(v)
    except ValueError as e:
        return str(e).replace("expected ", "").split(", got ")[0]
    if n > MAX_BYTES:
        return "a size of at most 1 EiB (more memory than any machine has)"
    return None if n > 0 else "a size > 0"


def budget_check(v):
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            pct = float(v.strip()[:-1])
        except ValueError:
            return "a size or a percentage such as '20%'"
        return None if 0 < pct <= 100 else "a percentage within (0, 100]"
    return size_check(v)


# -- loading ----------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        if not p.exists():
            raise ScenarioError(f"{p}: no such file")
        if p.is_dir():
            raise ScenarioError(f"{p}: is a directory, expected a YAML file")
        with open(p, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(f"{p}: larger than {MAX_FILE_BYTES >> 20} MiB, expected a scenario "
                            f"or profile file of a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ScenarioError(f"{p}:{line}:{col}: not UTF-8 text (byte 0x{raw[e.start]:02x}), "
                            f"expected a UTF-8 YAML file") from None
    data = parse_yaml(text, str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` whose every failure is one ScenarioError line naming ``source``,
    and whose result is checked for depth and size before anything recurses over it."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ScenarioError(f"{where}: YAML syntax error: {_one_line(e.problem)}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, say)
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ScenarioError(f"{source}:{line}:{col}: YAML syntax error: character "
                            f"#x{e.character if isinstance(e.character, int) else ord(e.character):04x} "
                            f"is not allowed in YAML") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}: YAML syntax error: {_one_line(str(e))}") from None
    except ValueError as e:  # a constructor's: an integer of more than 4300 digits, say
        raise ScenarioError(f"{source}: a value YAML cannot hold: {_one_line(e)}") from None
    except RecursionError:
        raise ScenarioError(f"{source}: nested too deeply for the YAML parser, expected at "
                            f"most {MAX_DEPTH} levels") from None
    check_shape(data, source)
    return data


def check_shape(data: Any, source: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH or holding more than MAX_VALUES values
    (without recursion: this is what keeps the recursive code after it safe)."""
    stack, seen = [(data, 0, "")], 0
    while stack:
        node, depth, path = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ScenarioError(f"{source}: more than {MAX_VALUES:,} values (YAML aliases "
                                f"expanding?), expected a scenario-sized document")
        if isinstance(node, dict):
            items = [(_join(path, str(k)), v) for k, v in node.items()]
        elif isinstance(node, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(node)]
        else:
            continue
        if depth >= MAX_DEPTH:
            raise ScenarioError(f"{source}: {path or 'the document'}: nested more than "
                                f"{MAX_DEPTH} levels deep, expected at most {MAX_DEPTH}")
        stack.extend((v, depth + 1, p) for p, v in items)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def parse_override(text: str, source: str = "--set") -> tuple[list[str], Any]:
    if "=" not in text:
        raise ScenarioError(f"{source} {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"{source} {text!r}: expected key.path=value")
    if len(key.split(".")) > MAX_DEPTH:
        raise ScenarioError(f"{source} {key}: more than {MAX_DEPTH} levels, expected a "
                            f"scenario key such as memory.l1_budget")
    where = f"{source} {key}"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw  # not YAML: the text itself, which the field's type check judges
    except RecursionError:
        raise ScenarioError(f"{where}: nested too deeply for the YAML parser, expected at "
                            f"most {MAX_DEPTH} levels") from None
    check_shape(value, where)
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (a copy); the dataclass build checks them."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def build(cls: type, data: Mapping | None, source: str, path: str = "") -> Any:
    """Construct dataclass ``cls`` from ``data``; every problem is a one-line ScenarioError."""
    data = {} if data is None else data
    where = f"{source}: {path}" if path else source
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ScenarioError(f"{source}: {_join(path, str(key))}: unknown key"
                                f"{_did_you_mean(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ScenarioError(f"{source}: {fpath}: missing field"
                                    f" ({_expected(hints[name])} expected)")
            continue
        value = _coerce(hints[name], data[name], source, fpath)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                why = f.metadata.get("why")
                raise ScenarioError(f"{source}: {fpath}: got {_show(data[name])}, expected "
                                    f"{problem}" + (f" ({why})" if why else ""))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a __post_init__ cross-field check
        raise ScenarioError(f"{where or source}: {e}") from None


def _coerce(tp, value, source, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, source, path)
            except ScenarioError as e:
                errors.append(e)
        raise ScenarioError(f"{source}: {path}: got {_show(value)}, expected {_expected(tp)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ScenarioError(f"{source}: {path}: got {_show(value)}, expected a list")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, source, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ScenarioError(f"{source}: {path}: got {_show(value)}, expected a mapping")
        vt = args[1] if len(args) > 1 else Any
        return {str(k): _coerce(vt, v, source, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                f = float(value)
            except OverflowError:  # an integer beyond any float
                f = math.inf
            if math.isfinite(f):
                return f
            raise ScenarioError(f"{source}: {path}: got {_show(value)}, expected a finite number")
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ScenarioError(f"{source}: {path}: got {_show(value)}, expected {_expected(tp)}")


def _expected(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (tuple, list):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v) if len(v) <= 80 else repr(v[:77]) + "..."
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"an integer of about {int(abs(v).bit_length() * 0.30103) + 1} digits"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return type(v).__name__
    return str(v)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of {', '.join(options)}"


def to_dict(obj) -> Any:
    """The resolved tree as plain data (for result.json and ``synapse validate``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key path of a dataclass tree (for sweeps' did-you-mean)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        p = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(field_paths(tp, p))
        else:
            out.append(p)
    return out
