"""Numerical integrity, on the backend's own memory and ops.

Fresh random fp16 blocks (seeded by the report's seed) are ingested into L1, then:

- INT4: the backend's ``Quantize`` op writes them to the INT4 staging space (the NumPy
  reference on ``cpu``, the CUDA kernel on ``cuda``); the bytes are read back, decoded with
  the reference and compared with the input: RMSE against the format's stated bound
  (every element within ``element_error_bound``: half a quantization step plus fp16
  storage terms), and the bytes against the reference's own encoding.
- fp16 round trip: the blocks are copied L1 -> L2 (D2H, to other offsets), L1 is zeroed
  and read back as zeros, the blocks are copied L2 -> L1 (H2D) and must equal the input
  bit for bit.
"""

from __future__ import annotations

import numpy as np

from ...hw import int4
from ...ops import Copy, Ingest, Quantize, Region, Stream, Zero
from .grade import at_most, equals, not_graded

TOKENS, LAYERS, HEADS, HEAD_DIM = 16, 2, 2, 64
NUMEL = TOKENS * 2 * LAYERS * HEADS * HEAD_DIM   # one KV block of the tiny scenarios
GROUP = 64


def _blocks(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 0x1A7E])
    # KV-like values: most near zero, a few outliers per block
    out = []
    for _ in range(n):
        x = rng.standard_normal(NUMEL).astype(np.float32)
        x[rng.integers(0, NUMEL, 8)] *= 8
        out.append(x.astype(np.float16))
    return out


def run(be, seed: int, n_blocks: int = 32) -> tuple[list, dict]:
    blocks = _blocks(seed, n_blocks)
    fp16_bytes = NUMEL * 2
    q_bytes = int4.int4_nbytes(NUMEL, GROUP)
    be.memory("l1", n_blocks * fp16_bytes, "device")
    be.memory("l2", n_blocks * fp16_bytes, "pinned_host")
    be.memory("staging", n_blocks * q_bytes, "device")
    offs = np.arange(n_blocks, dtype=np.int64) * fp16_bytes
    regions = tuple(Region("l1", int(o), fp16_bytes) for o in offs)
    raw = [b.view(np.uint8) for b in blocks]

    def quantize_and_demote():
        t = be.submit(Ingest(purpose="audit", dst=regions, source=lambda i: raw[i]), Stream.H2D)
        q = be.submit(Quantize(purpose="audit", src_space="l1", dst_space="staging",
                               src_offsets=offs, dst_offsets=np.arange(n_blocks) * q_bytes,
                               src_sizes=np.full(n_blocks, fp16_bytes),
                               dst_sizes=np.full(n_blocks, q_bytes), numel=NUMEL,
                               group_size=GROUP), Stream.COMPUTE, [t])
        c = be.submit(Copy(purpose="demote", direction="d2h", src_space="l1", dst_space="l2",
                           src_offsets=offs, dst_offsets=offs[::-1].copy(),
                           sizes=np.full(n_blocks, fp16_bytes)), Stream.D2H, [t])
        z = be.submit(Zero(purpose="audit", regions=regions), Stream.H2D, [c, q])
        yield be.wait([q, c, z])

    def fetch_back():
        c = be.submit(Copy(purpose="fetch", direction="h2d", src_space="l2", dst_space="l1",
                           src_offsets=offs[::-1].copy(), dst_offsets=offs,
                           sizes=np.full(n_blocks, fp16_bytes)), Stream.H2D)
        yield be.wait([c])

    be.run(quantize_and_demote())
    err2 = bound2 = s2 = 0.0
    worst = 0.0
    bytes_differ = 0
    for i, x in enumerate(blocks):
        qb = be.read_region(Region("staging", i * q_bytes, q_bytes))
        x_hat = int4.unpack_from(qb, NUMEL, GROUP, np.float32)
        d = np.abs(x.astype(np.float64) - x_hat)
        bound = int4.element_error_bound(x, x_hat, GROUP)
        worst = max(worst, float((d / bound).max()))
        err2 += float((d * d).sum())
        bound2 += float((bound * bound).sum())
        ref = int4.quantize(x, GROUP)
        packed, scales, _ = int4.split_sections(qb, NUMEL, GROUP)
        s2 += float((scales.astype(np.float64) ** 2).sum())
        want = np.concatenate([ref.packed, ref.scales.view(np.uint8), ref.zeros.view(np.uint8)])
        bytes_differ += int((qb != want).sum())
    n = n_blocks * NUMEL
    rmse, bound_rmse = (err2 / n) ** 0.5, (bound2 / n) ** 0.5
    uniform = (s2 / (n / GROUP) / 12) ** 0.5  # sqrt(mean(scale^2) / 12)
    zeroed = sum(int(be.read_region(r).any()) for r in regions)
    be.run(fetch_back())
    mismatched = sum(int((be.read_region(r) != raw[i]).sum()) for i, r in enumerate(regions))
    checks = [
        at_most("int4_rmse_over_bound", rmse / bound_rmse, 1.0, critical=True,
                note=f"RMSE {rmse:.5f} vs the bound's RMS {bound_rmse:.5f} "
                     f"(uniform-quantizer model sqrt(mean(s^2)/12) = {uniform:.5f})"),
        at_most("int4_worst_element_over_bound", worst, 1.0, critical=True,
                note="max over elements of |x - x_hat| / element_error_bound"),
        equals("l1_zeroed_between_trips_blocks_nonzero", zeroed, 0, critical=True,
               note="L1 was zeroed after the D2H copy, so the bytes that return came from L2"),
        equals("fp16_roundtrip_bytes_mismatched", mismatched, 0, critical=True,
               note=f"{n_blocks} blocks of {fp16_bytes} bytes, L1 -> L2 -> L1"),
    ]
    if be.name == "cpu":
        checks.append(not_graded("int4_bytes_differ_from_reference", bytes_differ, "== 0",
                                 "the cpu backend quantizes with the NumPy reference itself"))
    else:
        checks.append(equals("int4_bytes_differ_from_reference", bytes_differ, 0, critical=True))
    details = {"blocks": n_blocks, "numel_per_block": NUMEL, "group_size": GROUP,
               "int4_rmse": rmse, "int4_bound_rms": bound_rmse, "int4_uniform_model_rmse": uniform,
               "int4_rel_rmse": rmse / float(np.sqrt(np.mean([np.mean(b.astype(np.float64) ** 2)
                                                               for b in blocks]))),
               "fp16_bytes_checked": n_blocks * fp16_bytes}
    return checks, details
