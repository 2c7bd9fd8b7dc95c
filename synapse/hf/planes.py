"""The L1 planes of a batch in one tensor, and the batch's per-layer path over them.

Every sequence of a batch keeps its own block table, policy and budget share
(``synapse.hf.batch``); what ``SharedL1`` shares is where the bytes are: sequence ``i``'s
L1 arena is the view ``[:, i]`` of one uint8 tensor ``[planes, B, plane bytes]``. Where
the rows' layouts allow it (``SharedPlanes._plan``, once per forward pass), a layer then
costs the ops of one sequence whatever the batch: its new tokens in by one copy per
plane (one scatter when rows are padded differently), its keys out as one view
``[B, kv_heads, N, head_dim]`` (row b's in ``[0, n_b)``, the rest masked), and the L2
blocks, where every row has the same counts, read through in one gather, one
dequantization and one concatenation. Otherwise the batch loops over its sequences.
A reordering (beams, the batch verbs) gathers the chosen rows into a new tensor.
"""

from __future__ import annotations

import torch

from .int4 import dequantize_layer_rows
from .scores import decode_mass, fused_for, token_mass, token_mass_fused


class SharedL1:
    """The L1 planes of a batch's sequences in one tensor, uint8 ``[planes, B, plane
    bytes]``: sequence ``i``'s arena is the view ``[:, i]`` (its own slots, block table and
    policy as before), so one op a layer writes or reads the keys of every sequence."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.t: torch.Tensor | None = None
        self.views: list = [None] * size
        self._typed = None

    def source(self, i: int):
        """The ``TorchBackend.l1_source`` of sequence ``i``: the batch's tensor is made by
        the first sequence that starts; one of another size (or device) is refused (None:
        that sequence allocates its own, and the batch takes the per-sequence path)."""
        def make(nbytes: int, planes: int, device):
            shape = (planes, self.size, nbytes // planes)
            if self.t is None:
                self.t = torch.zeros(shape, dtype=torch.uint8, device=device)
            elif tuple(self.t.shape) != shape or self.t.device != torch.device(device):
                return None
            self.views[i] = self.t[:, i]
            return self.views[i]
        return make

    def holds(self, children) -> bool:
        """Whether every sequence's L1 is its view of the shared tensor, in batch order."""
        if self.t is None or len(children) != self.size:
            return False
        for c, v in zip(children, self.views):
            if c._backend is None or c._backend.space("l1").t is not v:
                return False
        return True

    def typed(self, dtype, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``[planes, B, tokens, kv_heads, head_dim]`` of ``dtype`` (made once per tensor)."""
        if self._typed is None or self._typed[0] is not self.t or self._typed[1] != dtype:
            p, b, per = self.t.shape
            item = torch.empty(0, dtype=dtype).element_size()
            n = per // (item * kv_heads * head_dim)
            view = self.t[..., : n * item * kv_heads * head_dim].view(dtype).view(
                p, b, n, kv_heads, head_dim)
            self._typed = (self.t, dtype, view)
        return self._typed[2]

    def regroup(self, children) -> None:
        """After a reordering: the sequences' L1 bytes gathered into one new tensor in
        the new order (one op), each sequence's arena pointed at its view. Sequences
        whose L1 cannot be shared (not started, virtual memory, other sizes) leave the
        batch on the per-sequence path."""
        mems = [None if c._backend is None else c._backend.space("l1") for c in children]
        self.size, self._typed = len(children), None
        if any(m is None or m.arena is not None for m in mems) \
                or len({(tuple(m.t.shape), m.t.device) for m in mems}) != 1:
            self.t, self.views = None, [None] * len(children)
            return
        self.t = torch.stack([m.t for m in mems], dim=1)
        self.views = [self.t[:, i] for i in range(len(children))]
        for m, v in zip(mems, self.views):
            m.t = v


class SharedPlanes:
    """``BatchedSequences``' path over a ``SharedL1`` (see the module docstring)."""

    def _plan(self, q: int, device, dtype):
        """This pass's views of the shared L1 planes, when every sequence's keys are its
        L1 front (no L2 block read through): ``out`` per plane, ``[B, kv_heads, N,
        head_dim]`` (row b's keys in ``[0, n_b)``, masked after), and where the new tokens
        go: ``new`` per plane when every row writes the same real tokens to the same
        slots (one copy a layer and plane), else the rows, source and slot indices of
        one scatter a layer and plane. None: the per-sequence path."""
        l1, kids = self.l1, self.children
        if l1 is None or not l1.holds(kids):
            return None
        steps = [c._step if n_real else None for c, (_, n_real) in zip(kids, self.rows)]
        c0 = kids[0]
        tm = l1.typed(dtype, c0.kv_heads, c0.head_dim)
        all_real = all(n_real == q for _, n_real in self.rows)
        if any(st is not None and st["l2_blocks"] for st in steps):
            # L2 read through: batched where every row has the same layout (equal
            # budgets and prompts: the counts coincide, the blocks need not)
            layouts = {None if st is None else
                       (st["new_at"], st["l1_tokens"], st["cut"], st["l2_blocks"]) for st in steps}
            if len(layouts) != 1 or None in layouts or not all_real:
                return None
            a, end, cut, m = layouts.pop()
            hm = tm[:, :, :end].permute(0, 1, 3, 2, 4)
            plan = {"new": hm[..., a:end, :].unbind(0), "tm": tm.unbind(0), "l2": (m, cut, end)}
            if steps[0].get("copy_stream") is None:  # the L2 runs are readable here: views
                slot = c0.stack.manager.spaces.l2.slot_bytes
                plan["l2_runs"] = [c._backend.space("l2").slots(slot)[:, :m].unbind(0)
                                   for c in kids]
            return plan
        n = max(1, max(self.lengths))
        hm = tm[:, :, :n].permute(0, 1, 3, 2, 4)  # [planes, B, kv_heads, N, head_dim]
        plan = {"out": hm.unbind(0)}
        firsts = {(st["new_at"], st["l1_tokens"]) if st is not None else None for st in steps}
        if len(firsts) == 1 and None not in firsts and all_real:
            a, end = firsts.pop()
            plan["new"] = hm[..., a:end, :].unbind(0)
            return plan
        rows, src, dst = [], [], []
        for i, (st, (sel, n_real)) in enumerate(zip(steps, self.rows)):
            if not n_real:
                continue
            rows += [i] * n_real
            if isinstance(sel, slice):
                src += range(*sel.indices(q))
            else:
                src += sel.tolist()
            dst += range(st["new_at"], st["new_at"] + n_real)
        idx = torch.tensor([rows, src, dst], dtype=torch.long).to(device)
        plan["scatter"] = (idx[0], idx[1], idx[2], tm.unbind(0))
        return plan

    def _update_shared(self, key_states, value_states, layer: int, query):
        """``update`` on the shared planes (``_plan``): the new tokens of every sequence in
        by one copy (or scatter) per plane, the keys out as one view; scores and step ends
        per sequence as on the per-sequence path."""
        plan, k, v = self.plan, 2 * layer, 2 * layer + 1
        new = plan.get("new")
        if new is not None:
            new[k].copy_(key_states)
            new[v].copy_(value_states)
        else:
            rows, src, dst, tm = plan["scatter"]
            tm[k].index_put_((rows, dst), key_states.transpose(1, 2)[rows, src])
            tm[v].index_put_((rows, dst), value_states.transpose(1, 2)[rows, src])
        if "l2" in plan:
            keys, values = self._read_through(layer)
        else:
            keys, values = plan["out"][k], plan["out"][v]
        last = layer == self.owner.num_layers - 1
        if query is not None:
            scaling = self.owner.tap.scaling(layer)
            if self.q == 1:  # a decode step: scored for the whole batch at once
                self._decode_mass(decode_mass(query, keys, scaling, self.allowed), last)
            else:  # a prefill chunk: per sequence (its fused passes, its causality)
                for i, child in enumerate(self.children):
                    sel, n_real = self.rows[i]
                    if not n_real:
                        continue
                    n_i = self.lengths[i]
                    ki = keys[i:i + 1, :, :n_i]
                    mass = token_mass_fused if fused_for(n_real, ki) else token_mass
                    child._add_mass(mass(query[i:i + 1, :, sel], ki, scaling, n_i - n_real))
        if last:
            for child, (_, n_real) in zip(self.children, self.rows):
                if n_real:
                    child._end_step()
        return keys, values

    def _read_through(self, layer: int):
        """Every row's keys in its own order (``TieredCache._read_through``: L1 before the
        tail, its L2 run, the tail and this step's), all rows the same layout: one
        gather of the L2 runs, one dequantization, one concatenation per plane."""
        plan, kids, o = self.plan, self.children, self.owner
        m, cut, n = plan["l2"]
        c0 = kids[0]
        b, bt, h, d = len(kids), c0.block_tokens, c0.kv_heads, c0.head_dim
        tk, tv = plan["tm"][2 * layer], plan["tm"][2 * layer + 1]
        runs = plan.get("l2_runs")
        if runs is not None:  # CPU: straight from each row's L2 planes
            per_layer = len(runs[0]) // o.num_layers
            lo = per_layer * layer
            data = torch.stack([r[j] for r in runs for j in range(lo, lo + per_layer)])
        else:  # CUDA: each row's run copied in ahead on its side stream
            data = []
            for c in kids:
                data.append(c._l2_rows(layer))
                if layer + 1 < o.num_layers:
                    c._prefetch_l2(layer + 1)
            if c0._step["l2_int4"] and c0._assemble_kernel():
                out = self._assemble(data, tk, tv, m, cut, n)
                for c in kids:
                    c._l2_consumed(layer)
                return out
            data = torch.stack(data)
        if c0._step["l2_int4"]:  # m layer rows per row: keys then values of each block
            sh = c0.shape
            xk, xv = dequantize_layer_rows(data.view(b * m, -1), bt, h * d, sh.int4_keys,
                                           sh.int4_group, c0.dtype)
            xk, xv = xk.view(b, m * bt, h, d), xv.view(b, m * bt, h, d)
        else:  # the runs' bytes, K then V, as the model's dtype
            x = data.view(b, -1).view(c0.dtype).view(b, 2, m * bt, h, d)
            xk, xv = x[:, 0], x[:, 1]
        keys = torch.cat((tk[:, :cut], xk, tk[:, cut:n]), dim=1).permute(0, 2, 1, 3)
        values = torch.cat((tv[:, :cut], xv, tv[:, cut:n]), dim=1).permute(0, 2, 1, 3)
        if runs is None:
            for c in kids:
                c._l2_consumed(layer)
        return keys, values

    def _assemble(self, data: list, tk, tv, m: int, cut: int, n: int):
        """The fused read-through kernel once per row, into one output for the batch."""
        from ..hw import kernels
        kids = self.children
        c0 = kids[0]
        sh, bt = c0.shape, c0.block_tokens
        b, total = len(kids), n + m * bt
        keys = torch.empty((b, total, c0.kv_heads, c0.head_dim), dtype=tk.dtype, device=tk.device)
        values = torch.empty_like(keys)
        item = tk.element_size()
        src_row, dst_row = tk.stride(0) * item, keys.stride(0) * item
        kp, vp, ko, vo = tk.data_ptr(), tv.data_ptr(), keys.data_ptr(), values.data_ptr()
        for i in range(b):
            kernels.kv_assemble_int4(kp + i * src_row, vp + i * src_row, data[i].data_ptr(),
                                     ko + i * dst_row, vo + i * dst_row, cut, m, bt,
                                     c0.kv_heads * c0.head_dim, total, sh.int4_group,
                                     key_channel=sh.int4_keys == "channel", stream=None)
        return keys.permute(0, 2, 1, 3), values.permute(0, 2, 1, 3)
