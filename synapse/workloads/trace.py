"""Attention traces: what a transformers model attended to, per step and KV block.

A trace file is an ``.npz`` (NumPy only, no torch needed to read it) holding:

- ``header``: a JSON string: ``format`` ("synapse-trace"), ``version``, ``model``
  (``model_type``, ``layers``, ``kv_heads``, ``head_dim``, ``dtype``), ``block_tokens``,
  ``steps``, ``prompt_tokens``, ``prefill_chunk``, ``decode_steps``, ``aggregation``;
- ``tokens``: int64 [steps], tokens in the sequence after each step (a step is one
  forward pass: a prompt chunk or one decode token);
- ``mass``: float32 [steps, blocks], the attention mass of each KV block at each step:
  per layer, the attention weights summed over the block's tokens and averaged over
  heads and queries (so a layer's masses sum to 1), then the mean over layers; exactly
  the value ``synapse.hf.TieredCache`` feeds its policy; 0 for blocks not yet written;
- ``layer_mass``: float16 [steps, layers, blocks], the per-layer masses before the mean;
- ``token_ids``: int64 [total tokens], the sequence that was fed (prompt + generated).

Replayed by the ``trace`` scenario kind (``synapse.drivers.trace``).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ScenarioError

FORMAT, VERSION = "synapse-trace", 1
AGGREGATION = ("per layer: attention weights summed over the block's tokens, averaged over "
               "heads and queries; then the mean over layers")


@dataclass
class Trace:
    header: dict
    tokens: np.ndarray
    mass: np.ndarray
    layer_mass: np.ndarray
    token_ids: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def block_tokens(self) -> int:
        return int(self.header["block_tokens"])

    @property
    def num_blocks(self) -> int:
        return self.mass.shape[1]

    @property
    def model(self) -> dict:
        return self.header["model"]

    def save(self, path) -> Path:
        import io

        from ..outputs import atomic_write
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.array(json.dumps(self.header)), tokens=self.tokens,
                            mass=self.mass, layer_mass=self.layer_mass, token_ids=self.token_ids)
        return atomic_write(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path) -> "Trace":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in ("tokens", "mass", "layer_mass", "token_ids")}
        except FileNotFoundError:
            raise ScenarioError(f"{path}: no such trace file") from None
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ScenarioError(f"{path}: not a Synapse trace file ({e})") from None
        if header.get("format") != FORMAT:
            raise ScenarioError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        t = cls(header, **arrays)
        need = math.ceil(int(t.tokens[-1]) / t.block_tokens) if len(t.tokens) else 0
        if t.mass.shape != (len(t.tokens), need):
            raise ScenarioError(f"{path}: mass has shape {t.mass.shape}, expected "
                                f"({len(t.tokens)}, {need}) for its tokens and block_tokens")
        return t

    def check_shape(self, layers: int, kv_heads: int, head_dim: int, block_tokens: int,
                    where: str) -> None:
        """ScenarioError naming expected and found when a scenario's model differs."""
        m = self.model
        found = (m["layers"], m["kv_heads"], m["head_dim"], self.block_tokens)
        want = (layers, kv_heads, head_dim, block_tokens)
        if found != want:
            raise ScenarioError(
                f"{where}: the trace is of another model shape: expected layers={layers}, "
                f"kv_heads={kv_heads}, head_dim={head_dim}, block_tokens={block_tokens} (the "
                f"scenario's model and memory.block_tokens), found layers={found[0]}, "
                f"kv_heads={found[1]}, head_dim={found[2]}, block_tokens={found[3]} "
                f"({m.get('model_type', '?')} in the trace)")
