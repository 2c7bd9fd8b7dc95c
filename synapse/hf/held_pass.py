"""A forward pass longer than ``TieredCache``'s L1 budget, taken whole
(``pass_over_budget="hold"``).

Without it such a pass is refused (the prompt must come in chunks that fit), and a
chunked prompt's later tokens attend to what the policy has already demoted (INT4) or
dropped. With it the pass is served as ``DynamicCache``, quanto's ``QuantizedCache`` and
kvpress serve a prompt: its tokens attend to their own keys and values at full
precision, and to every kept token before them; only what is *stored* afterwards is held
to the budget.

1. Attention, per layer: the kept keys as any step returns them (L1, L2 read through),
   then the pass's own, the model's tensors as they come (no copy). The cache keeps a
   reference to each layer's until the pass ends: for that time the device holds the
   pass's full-precision KV of every layer besides L1 (``pass_peak_bytes``), as
   ``DynamicCache`` does for good. Which blocks stay in L1 depends on the attention of
   every layer (h2o, lru), so no layer's can be placed before the last has run.
2. Storage, after the last layer: the pass's tokens go in one block per planner step,
   as a prompt fed in 1-block chunks would (the partial tail block first), each step
   admitting its block (the policy demotes or drops to make room), writing its keys and
   values and feeding the policy that block's queries' attention (``token_mass`` of
   those queries over every key before them, the mean over layers): H2O's online rule,
   with the scores of full attention. The policy's choices are then a 1-block chunked
   prefill's with this pass's attention; the stored bytes are the model's own. Each
   storage step is a step of the decision log and of ``telemetry()["steps"]``.
"""

from __future__ import annotations

import numpy as np
import torch

from .scores import token_mass


class HeldPass:
    """Mixed into ``TieredCache`` (see the module docstring)."""

    def _holds_pass(self, q: int) -> bool:
        """Whether a pass of ``q`` tokens is taken whole: held passes on, and too long to
        fit the L1 budget as a step."""
        pl = self.planner
        return self.pass_over_budget == "hold" and pl.step_blocks(q) > pl.capacity_blocks

    def _begin_held(self, q: int) -> None:
        """The pass's reads (every kept block, once) and the layout of the kept keys; the
        pass's own tokens are not admitted yet (``_store_held``)."""
        self._backend.safe_point()
        self.step += 1
        self._begun = True
        self.planner.begin(self.step)
        self._layout(0)
        bt, seen = self.block_tokens, self.seen_tokens
        first = min(q, bt - seen % bt)  # the tail block's free tokens (a whole block when none)
        cuts = [0] + list(range(first, q, bt)) + [q]
        st = self._step
        st["held"] = {"q": q, "cuts": cuts, "keys": [], "values": [], "mass": None,
                      "layer_mass": [], "key_block": None}
        self._step_mass = None
        self._layer_mass_rows = []
        self.held_pass_bytes = 0
        self._track_pass_peak()

    def _key_blocks(self, old: int, q: int, device) -> torch.Tensor:
        """The block id of each key the pass's attention sees, in key order: the kept
        blocks as ``_slot_order`` lays them (the partial tail's ``seen % bt`` tokens
        last), then the pass's tokens by position."""
        bt, seen = self.block_tokens, self.seen_tokens
        order = self._slot_order()
        tail = seen % bt
        per = np.full(len(order), bt, np.int64)
        if tail:
            per[-1] = tail  # with the tail last in L1 and no L2 after it, it is last here
        kept = np.repeat(order, per)
        new = (seen + np.arange(q, dtype=np.int64)) // bt
        ids = np.concatenate((kept, new))
        assert len(ids) == old + q, "the kept keys must be whole blocks and the tail"
        return torch.from_numpy(ids).to(device)

    def _update_held(self, key_states, value_states, layer: int, qs):
        """One layer of a held pass: the kept keys then the pass's own, all at the
        precision they are held in (the pass's: the model's); the layer's scores per
        block of queries."""
        st = self._step
        h = st["held"]
        if st["l2_blocks"]:
            old_k, old_v = self._read_through(layer, st["l1"][2 * layer], st["l1"][2 * layer + 1],
                                              st["cut"], st["l1_tokens"])
        else:
            n = st["l1_tokens"]
            old_k = st["l1"][2 * layer, :n].permute(1, 0, 2).unsqueeze(0)
            old_v = st["l1"][2 * layer + 1, :n].permute(1, 0, 2).unsqueeze(0)
        keys = torch.cat((old_k, key_states), dim=-2)
        values = torch.cat((old_v, value_states), dim=-2)
        h["keys"].append(key_states)
        h["values"].append(value_states)
        self.held_pass_bytes += key_states.nbytes + value_states.nbytes
        self._track_pass_peak()
        if qs is not None:
            self._score_held(qs, keys, layer)
        if layer == self.num_layers - 1:
            self._store_held()
        return keys, values

    def _score_held(self, qs, keys, layer: int) -> None:
        """Attention per block of keys from each storage step's queries: rows ``[steps,
        blocks]``, summed over layers (``_store_held`` takes the mean)."""
        h = self._step["held"]
        q, cuts = h["q"], h["cuts"]
        old = keys.shape[-2] - q
        if h["key_block"] is None:
            h["key_block"] = self._key_blocks(old, q, keys.device)
        kb = h["key_block"]
        nb = int(kb[-1]) + 1
        scale = self.tap.scaling(layer)
        rows = torch.zeros((len(cuts) - 1, nb), dtype=torch.float32, device=keys.device)
        for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
            tok = token_mass(qs[:, :, a:b], keys[:, :, :old + b], scale, old + a)
            rows[j].index_add_(0, kb[:old + b], tok)
        h["mass"] = rows.clone() if h["mass"] is None else h["mass"].add_(rows)
        if self.record_masses:
            h["layer_mass"].append(rows)

    def _store_held(self) -> None:
        """The pass's tokens into the tiers, one block per planner step (see the module
        docstring); each step's masses are observed and its background moves made at
        once (the attention that read the arena is done: it returned copies)."""
        st = self._step
        h = st.pop("held")
        pl, cuts = self.planner, h["cuts"]
        mass = None if h["mass"] is None else (h["mass"] / self.num_layers).cpu().numpy()
        layer_rows = [r.cpu().numpy() for r in h["layer_mass"]]
        for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if j:
                self.step += 1
            t = self.step
            for moves in pl.admit(t, b - a):
                self._moves(moves, t)
            self._moves([], t)
            self._layout(b - a)
            new = self._step_views(self._step)
            for layer, (k, v) in enumerate(zip(h["keys"], h["values"])):
                new[2 * layer].copy_(k[:, :, a:b])
                new[2 * layer + 1].copy_(v[:, :, a:b])
            self.seen_tokens = pl.tokens
            live = pl.live_ids()
            self._step_mass = None if mass is None else mass[j][live]
            if self.record_masses and mass is not None:
                self.masses.append(self._step_mass.copy())
                self.layer_masses.append(np.stack([r[j][live] for r in layer_rows]))
            self._pending = True
            self._track_pass_peak()
            self.settle()
        self._begun = False
        self._layout(0)  # what the cache holds now, for inspect_layer and the next step
        self.held_pass_bytes = 0

    def _track_pass_peak(self) -> None:
        self.pass_peak_bytes = max(self.pass_peak_bytes,
                                   self.device_kv_bytes() + self.held_pass_bytes)
