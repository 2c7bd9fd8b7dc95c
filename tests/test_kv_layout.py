"""The KV block byte layout (synapse/hw/kv_layout.py): sizes, offsets, alignment, round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.hw import int4
from synapse.hw.kv_layout import FMT_FP16, FMT_INT4, KVLayout, format_code, format_name


def test_sizes_of_a_llama_like_block():
    lay = KVLayout(layers=32, kv_heads=8, head_dim=128, block_tokens=16, group_size=64,
                   int4_keys="token")
    n = 2 * 32 * 8 * 16 * 128
    assert lay.shape == (16, 2, 32, 8, 128)
    assert lay.numel == n
    assert lay.fp16_bytes == 2 * n == 2 * 32 * 8 * 16 * 128 * 2
    assert lay.int4_bytes == n // 2 + 4 * n // 64
    assert lay.nbytes("fp16") == lay.nbytes(FMT_FP16) == lay.fp16_bytes
    assert lay.nbytes("int4") == lay.nbytes(FMT_INT4) == lay.int4_bytes
    # int4 with G=64 costs 4.5 bits per element instead of 16
    assert lay.int4_bytes * 8 / n == pytest.approx(4.5)


def test_int4_section_offsets():
    lay = KVLayout(layers=2, kv_heads=3, head_dim=64, block_tokens=4, group_size=32,
                   int4_keys="token")
    n = lay.numel
    assert lay.int4_offsets == (0, n // 2, n // 2 + 2 * n // 32)


@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 7),
    heads=st.integers(1, 7),
    groups_per_row=st.integers(1, 4),
    group_size=st.sampled_from(int4.GROUP_SIZES),
    block_quads=st.integers(1, 8),
)
def test_every_int4_section_is_16_byte_aligned(layers, heads, groups_per_row, group_size, block_quads):
    lay = KVLayout(layers, heads, groups_per_row * group_size, 4 * block_quads, group_size)
    for offset in lay.int4_offsets + (lay.int4_bytes, lay.fp16_bytes):
        assert offset % 16 == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=0, kv_heads=1, head_dim=64, block_tokens=4), "layers"),
        (dict(layers=1, kv_heads=-2, head_dim=64, block_tokens=4), "kv_heads"),
        (dict(layers=1, kv_heads=1, head_dim=64, block_tokens=4.0), "block_tokens"),
        (dict(layers=1, kv_heads=1, head_dim=96, block_tokens=4, group_size=64), "multiple of group_size"),
        (dict(layers=1, kv_heads=1, head_dim=64, block_tokens=6), "multiple of 4"),
        (dict(layers=1, kv_heads=1, head_dim=64, block_tokens=4, group_size=16), "group_size"),
    ],
)
def test_invalid_layouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVLayout(**kwargs)


def test_format_names_and_codes():
    assert format_code("fp16") == 0 and format_code("int4") == 1 and format_code(1) == 1
    assert format_name(0) == "fp16" and format_name("int4") == "int4"
    for bad in ("bf16", 2, True, None):
        with pytest.raises(ValueError, match="KV format"):
            format_code(bad)


def _labelled(lay: KVLayout) -> np.ndarray:
    """A tensor whose value encodes its own index (exact in fp16 for small shapes)."""
    return np.arange(lay.numel, dtype=np.float32).reshape(lay.shape).astype(np.float16)


def test_fp16_element_address():
    """Element [t, kv, l, h, d] lives at byte 2 * ((((t*2 + kv)*L + l)*H + h)*D + d)."""
    lay = KVLayout(layers=2, kv_heads=2, head_dim=32, block_tokens=4, group_size=32)
    kv = _labelled(lay)
    raw = lay.pack(kv, "fp16")
    L, H, BT, D = lay.layers, lay.kv_heads, lay.block_tokens, lay.head_dim
    for idx in [(0, 0, 0, 0, 0), (0, 1, 0, 0, 0), (3, 0, 1, 1, 31), (2, 1, 1, 0, 7)]:
        t, c, l, h, d = idx
        offset = 2 * ((((t * 2 + c) * L + l) * H + h) * D + d)
        assert raw[offset : offset + 2].view(np.float16)[0] == kv[idx]
    view = lay.view_fp16(raw)
    assert np.shares_memory(view, raw)
    np.testing.assert_array_equal(view, kv)


def test_fp16_round_trip_is_exact():
    lay = KVLayout(layers=3, kv_heads=2, head_dim=64, block_tokens=8)
    kv = np.random.default_rng(0).standard_normal(lay.shape).astype(np.float16)
    np.testing.assert_array_equal(lay.unpack(lay.pack(kv, "fp16"), "fp16"), kv)


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_int4_form_is_the_int4_format_of_the_flat_tensor(group_size):
    lay = KVLayout(layers=2, kv_heads=3, head_dim=128, block_tokens=8, group_size=group_size,
                   int4_keys="token")
    kv = np.random.default_rng(group_size).standard_normal(lay.shape).astype(np.float16)
    buf = lay.pack(kv, "int4")
    assert buf.size == lay.int4_bytes
    reference = int4.quantize(kv.reshape(-1), group_size)
    assert buf.tobytes() == (
        reference.packed.tobytes() + reference.scales.tobytes() + reference.zeros.tobytes()
    )
    np.testing.assert_array_equal(lay.unpack(buf, "int4"), int4.dequantize(reference).reshape(lay.shape))


def test_int4_groups_never_straddle_two_tokens():
    """Each (kv, l, h, t) row is constant but rows differ: exact only if groups stay in a row."""
    lay = KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=4, group_size=32)
    rows = np.arange(lay.numel // lay.head_dim, dtype=np.float16).reshape(lay.shape[:-1])
    kv = np.broadcast_to(rows[..., None], lay.shape).astype(np.float16)
    np.testing.assert_array_equal(lay.unpack(lay.pack(kv, "int4"), "int4"), kv)


def test_pack_writes_into_a_given_buffer_and_checks_it():
    lay = KVLayout(layers=1, kv_heads=1, head_dim=32, block_tokens=4, group_size=32)
    kv = _labelled(lay)
    out = np.full(lay.int4_bytes, 0xEE, dtype=np.uint8)
    assert lay.pack(kv, "int4", out=out) is out
    with pytest.raises(ValueError, match="needs 512"):
        lay.pack(kv, "fp16", out=np.zeros(511, dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        lay.pack(kv[:2], "fp16")
    with pytest.raises(ValueError, match="float16"):
        lay.pack(kv.astype(np.float32), "fp16")
    with pytest.raises(ValueError, match="uint8"):
        lay.view_fp16(np.zeros(128, dtype=np.float16))


# --------------------------------------------------------------------------- channel-key INT4


def test_channel_form_is_a_per_channel_key_row_then_a_per_token_value_row():
    lay = KVLayout(layers=2, kv_heads=3, head_dim=64, block_tokens=8, group_size=32,
                   int4_keys="channel")
    kv = np.random.default_rng(5).standard_normal(lay.shape).astype(np.float16)
    buf = lay.pack(kv, "int4")
    c = 2 * 3 * 64
    keys = int4.quantize_channels(kv[:, 0].reshape(8, c))
    values = int4.quantize(kv[:, 1].reshape(-1), 32)
    assert buf.tobytes() == b"".join(a.tobytes() for a in (
        keys.packed, keys.scales, keys.zeros, values.packed, values.scales, values.zeros))
    back = lay.unpack(buf, "int4")
    np.testing.assert_array_equal(back[:, 0], int4.dequantize_channels(keys).reshape(8, 2, 3, 64))
    np.testing.assert_array_equal(back[:, 1], int4.dequantize(values).reshape(8, 2, 3, 64))


def test_both_key_formats_cost_what_the_kv_engine_accounts():
    """The scenario layout and the planes of synapse.kv hold the same elements in the same
    groups, so a block's INT4 bytes are one figure for the manager, the simulator and the
    cpu backend: L x (key row + value row)."""
    from synapse.kv.shape import KVShape
    for keys in ("channel", "token"):
        for bt, g in ((16, 64), (4, 32), (64, 128)):
            lay = KVLayout(3, 2, 128, bt, g, keys)
            shape = KVShape(3, 2, 128, bt, g, int4_keys=keys)
            assert lay.int4_bytes == shape.int4_bytes == 3 * shape.layer_int4_bytes
    shape = KVShape(32, 8, 128, 16, 64, int4_keys="channel")
    n = shape.plane_numel
    assert shape.key_row_int4_bytes == n // 2 + 4 * 8 * 128   # 6 bits per key
    assert shape.value_row_int4_bytes == n // 2 + 4 * n // 64  # 4.5 bits per value
    assert 8 * shape.int4_bytes / shape.numel == pytest.approx(5.25)


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 5), heads=st.integers(1, 5), groups_per_row=st.integers(1, 3),
       group_size=st.sampled_from(int4.GROUP_SIZES), block_quads=st.integers(1, 8))
def test_channel_sections_are_16_byte_aligned(layers, heads, groups_per_row, group_size,
                                              block_quads):
    lay = KVLayout(layers, heads, groups_per_row * group_size, 4 * block_quads, group_size,
                   "channel")
    assert len(lay.int4_offsets) == 5
    for offset in lay.int4_offsets + (lay.int4_bytes,):
        assert offset % 16 == 0


def test_a_shape_without_int4_still_has_sizes_for_its_unused_staging():
    from synapse.kv.shape import KVShape
    shape = KVShape(2, 1, 4, 4, 32, int4_keys="token")  # head_dim 4: no INT4 group fits
    assert not shape.int4_ok and shape.int4_bytes > 0


def test_an_unknown_key_format_is_refused():
    with pytest.raises(ValueError, match="channel, token"):
        KVLayout(1, 1, 64, 4, 32, "head")
