"""``result.json`` from the Python entry points, in the runner's format (``synapse.runner``),
so ``synapse dashboard`` and ``synapse compare`` read them like any ``synapse run``."""

from __future__ import annotations

from pathlib import Path


def torch_environment() -> dict:
    from ..runner import environment
    env = environment()
    try:
        import torch
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def make_result(name: str, kind: str, backend: str, policy: str, config: dict, metrics: dict,
                timeline: dict) -> dict:
    env = torch_environment()
    env["backend"] = {"name": backend}
    return {"scenario": name, "kind": kind, "backend": backend, "policy": policy,
            "config": config, "environment": env, "metrics": metrics, "timeline": timeline}


def dump(result: dict, decisions: list, path) -> Path:
    """Write ``result.json`` (and ``decisions.jsonl``, ``ops.json``) into folder ``path``."""
    from ..runner import RunResult, write_result
    return write_result(RunResult(result, list(decisions), {}), Path(path))
