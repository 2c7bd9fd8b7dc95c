"""The INT4 format, pinned down: bit layout, rounding, error bound (synapse/hw/int4.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from synapse.hw import int4

# --------------------------------------------------------------------------- a hand-checked vector
#
# Three groups of G = 32 fp16 values, chosen so every code can be worked out by hand.
# group 0: 0, 1, ..., 15, 15, 14, ..., 0      min 0, max 15 -> scale 1.0 (0x3C00), zero 0
#          codes = the values; pairs (0,1) -> 0x10, (2,3) -> 0x32, ..., (1,0) -> 0x01
# group 1: -4 + k/2, k = 0..31               min -4 (0xC400), range 15.5 -> scale
#          15.5/15 = 1.0333.. -> fp16 1058/1024 = 1.033203125 (0x3C22); code of k is
#          rint(0.5k / 1.033203125) = rint(0.48393 k) = 0,0,1,1,2,2,...,15,15
#          -> pairs (i, i) -> bytes 0x00, 0x11, ..., 0xFF
# group 2: 0, 15, 0.5, 1.5, ..., 14.5, then 7.0 x 15   scale 1, zero 0; the .5 values are
#          exact ties and round half to even: 0,2,2,4,4,6,6,8,8,10,10,12,12,14,14
HAND_INPUT = np.array(
    list(range(16)) + list(range(15, -1, -1))
    + [-4 + k / 2 for k in range(32)]
    + [0, 15] + [k + 0.5 for k in range(15)] + [7.0] * 15,
    dtype=np.float16,
)
HAND_PACKED = bytes.fromhex(
    "10325476 98badcfe efcdab89 67452301"
    "00112233 44556677 8899aabb ccddeeff"
    "f0204264 86a8caec 7e777777 77777777"
)
HAND_SCALES = bytes.fromhex("003c 223c 003c")  # little-endian fp16: 1.0, 1.033203125, 1.0
HAND_ZEROS = bytes.fromhex("0000 00c4 0000")  # 0.0, -4.0, 0.0
HAND_CODES_G1 = np.repeat(np.arange(16), 2)
HAND_CODES_G2 = [0, 15, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14] + [7] * 15


def test_hand_vector_packs_to_the_expected_bytes():
    buf = np.zeros(int4.int4_nbytes(HAND_INPUT.size, 32), dtype=np.uint8)
    assert buf.size == 48 + 6 + 6
    int4.pack_into(HAND_INPUT, 32, buf)
    assert buf.tobytes() == HAND_PACKED + HAND_SCALES + HAND_ZEROS


def test_hand_vector_dequantizes_to_the_grid():
    buf = np.zeros(int4.int4_nbytes(HAND_INPUT.size, 32), dtype=np.uint8)
    int4.pack_into(HAND_INPUT, 32, buf)
    out = int4.unpack_from(buf, HAND_INPUT.size, 32, np.float32)
    np.testing.assert_array_equal(out[:32], HAND_INPUT[:32])  # exact grid points
    expected_g1 = np.float32(-4) + HAND_CODES_G1.astype(np.float32) * np.float32(1.033203125)
    np.testing.assert_array_equal(out[32:64], expected_g1)
    np.testing.assert_array_equal(out[64:], np.array(HAND_CODES_G2, dtype=np.float32))


def test_quantize_exposes_the_same_sections():
    t = int4.quantize(HAND_INPUT, 32)
    assert t.packed.tobytes() == HAND_PACKED
    assert t.scales.tobytes() == HAND_SCALES
    assert t.zeros.tobytes() == HAND_ZEROS
    assert t.shape == (96,) and t.dtype == np.float16 and t.nbytes == 60


# --------------------------------------------------------------------------- layout and API


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_nbytes_and_section_offsets(group_size):
    n = group_size * 24
    assert int4.int4_nbytes(n, group_size) == n // 2 + 4 * n // group_size
    packed, scales, zeros = int4.section_offsets(n, group_size)
    assert (packed, scales, zeros) == (0, n // 2, n // 2 + 2 * n // group_size)
    assert scales % 16 == 0  # G >= 32 keeps the scales 16-byte aligned


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_shape_and_dtype_round_trip(group_size):
    rng = np.random.default_rng(group_size)
    x = rng.standard_normal((3, 2, group_size)).astype(np.float32)
    t = int4.quantize(x, group_size)
    y = int4.dequantize(t)
    assert y.shape == x.shape and y.dtype == np.float32
    assert t.packed.dtype == np.uint8 and t.scales.dtype == np.float16 and t.zeros.dtype == np.float16


def test_pack_into_and_quantize_agree():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64 * 10).astype(np.float16)
    t = int4.quantize(x, 64)
    buf = np.full(t.nbytes, 0xAB, dtype=np.uint8)
    int4.pack_into(x, 64, buf)
    assert buf.tobytes() == t.packed.tobytes() + t.scales.tobytes() + t.zeros.tobytes()
    np.testing.assert_array_equal(int4.unpack_from(buf, x.size, 64), int4.dequantize(t))


@pytest.mark.parametrize(
    "group_size, n, message",
    [(16, 64, "group_size"), (48, 96, "group_size"), (True, 64, "group_size"),
     (32, 40, "not divisible"), (32, 0, "positive")],
)
def test_bad_group_size_or_length_is_refused(group_size, n, message):
    with pytest.raises(ValueError, match=message):
        int4.quantize(np.zeros(n, dtype=np.float16), group_size)


def test_non_finite_or_non_float_input_is_refused():
    x = np.zeros(32, dtype=np.float32)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        int4.quantize(x, 32)
    with pytest.raises(ValueError, match="float16 or float32"):
        int4.quantize(np.zeros(32, dtype=np.int32), 32)
    with pytest.raises(ValueError, match="fit in float16"):
        int4.quantize(np.array([0.0] * 31 + [1e7], dtype=np.float32), 32)


def test_wrong_buffer_size_is_refused():
    with pytest.raises(ValueError, match="exactly 40"):
        int4.pack_into(np.zeros(64, dtype=np.float16), 32, np.zeros(41, dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        int4.unpack_from(np.zeros(40, dtype=np.int8), 64, 32)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_gaussian_rmse_matches_the_uniform_quantizer_bound(group_size):
    """A uniform quantizer's error is ~U(-s/2, s/2): RMSE = sqrt(mean(s^2)/12).

    The group's min and max land on the grid (error ~0), so the measured RMSE sits a
    little below the bound, by sqrt((G-2)/G) at most (3% for G=32): 10% is a safe band.
    """
    rng = np.random.default_rng(100 + group_size)
    x = rng.standard_normal(1 << 18).astype(np.float32)
    t = int4.quantize(x, group_size)
    measured = int4.measured_rmse(x, int4.dequantize(t))
    expected = int4.expected_rmse(t.scales)
    assert abs(measured - expected) <= 0.10 * expected, (measured, expected)


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("value", [0.0, -3.25, 1000.0, 6.1e-5])
def test_constant_groups_round_trip_exactly(group_size, value):
    x = np.full(group_size * 3, value, dtype=np.float16)
    t = int4.quantize(x, group_size)
    assert not t.scales.any() and not t.packed.any()
    np.testing.assert_array_equal(int4.dequantize(t), x)


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_negative_zero_is_stored_as_positive_zero(group_size):
    """min/max may return either of two equal zeros; the stored bits must not depend on it."""
    x = np.zeros(2 * group_size, dtype=np.float16)
    x[0::2] = -0.0  # group 0: +0 and -0 only
    x[group_size:] = np.abs(np.linspace(0, 3, group_size)).astype(np.float16)
    x[group_size + 1] = -0.0  # group 1: min is a signed zero, max 3
    t = int4.quantize(x, group_size)
    assert t.zeros.view(np.uint16).tolist() == [0, 0]
    assert t.scales.view(np.uint16)[0] == 0  # the all-zero group: scale +0, not -0
    t = int4.quantize(x[::-1].copy(), group_size)  # other order, same bits
    assert t.zeros.view(np.uint16).tolist() == [0, 0]
    assert t.scales.view(np.uint16)[1] == 0


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    group_size=st.sampled_from(int4.GROUP_SIZES),
    groups=st.integers(1, 4),
    dtype=st.sampled_from([np.float16, np.float32]),
)
def test_every_element_is_within_half_a_step(data, group_size, groups, dtype):
    elements = st.floats(-1000, 1000, width=16 if dtype == np.float16 else 32)
    x = data.draw(hnp.arrays(dtype, groups * group_size, elements=elements))
    x_hat = int4.dequantize(int4.quantize(x, group_size))
    err = np.abs(x.astype(np.float64) - x_hat.astype(np.float64))
    bound = int4.element_error_bound(x, x_hat, group_size)
    assert (err <= bound).all(), (err - bound).max()


def test_expected_rmse_formula():
    assert int4.expected_rmse(np.array([1.0, 1.0], dtype=np.float16)) == pytest.approx(12 ** -0.5)
    assert int4.expected_rmse([0.0, 2.0]) == pytest.approx((2.0 / 12) ** 0.5)
    with pytest.raises(ValueError):
        int4.expected_rmse([])


# --------------------------------------------------------------------------- per-channel rows
#
# Four tokens of eight channels, x[t, c] = t * (c + 1): channel c's range is 3 (c + 1), so
# its scale is fp16((c + 1) / 5) and every channel's codes are 0, 5, 10, 15 (the rounding
# of the scale moves the quotients by far less than half a code). Codes are stored in C
# order, token after token: token t's 8 codes are 4 bytes of (5t | 5t << 4).
CHANNEL_HAND = (np.arange(4)[:, None] * np.arange(1, 9)[None, :]).astype(np.float16)
CHANNEL_PACKED = bytes.fromhex("00000000 55555555 aaaaaaaa ffffffff")


def test_per_channel_hand_vector_packs_to_the_expected_bytes():
    buf = np.zeros(int4.channel_nbytes(4, 8), dtype=np.uint8)
    assert buf.size == 16 + 16 + 16  # codes, 8 fp16 scales, 8 fp16 zeros
    int4.pack_channels_into(CHANNEL_HAND, buf)
    scales = (np.arange(1, 9, dtype=np.float32) * 3 / np.float32(15)).astype(np.float16)
    assert buf.tobytes() == CHANNEL_PACKED + scales.tobytes() + bytes(16)
    out = int4.unpack_channels_from(buf, 4, 8, np.float32)
    expected = np.arange(4)[:, None].astype(np.float32) * 5 * scales.astype(np.float32)[None, :]
    np.testing.assert_array_equal(out, expected)  # zero + code * scale, in fp32


def test_per_channel_sections_and_alignment():
    assert int4.channel_nbytes(16, 256) == 16 * 256 // 2 + 4 * 256
    assert int4.channel_section_offsets(16, 256) == (0, 2048, 2048 + 512)
    for tokens in (4, 8, 12, 16, 64):
        for channels in (8, 24, 64, 8 * 37):
            offsets = int4.channel_section_offsets(tokens, channels)
            assert all(o % 16 == 0 for o in offsets + (int4.channel_nbytes(tokens, channels),))


def test_an_outlier_channel_costs_the_other_channels_nothing():
    """KIVI's observation, as a spec: keys with one channel of large magnitude. Per token,
    that channel sets every token's step and the others lose their resolution; per
    channel, each keeps its own range."""
    rng = np.random.default_rng(7)
    x = (0.1 * rng.standard_normal((16, 64))).astype(np.float32)
    x[:, 5] += 20.0 + rng.standard_normal(16).astype(np.float32)
    per_channel = int4.dequantize_channels(int4.quantize_channels(x))
    per_token = int4.dequantize(int4.quantize(x, 64))
    others = np.arange(64) != 5
    err_c = np.abs(per_channel - x)[:, others].max()
    err_t = np.abs(per_token - x)[:, others].max()
    assert err_c < 0.03 < 0.3 < err_t, (err_c, err_t)


def test_per_channel_groups_are_columns():
    """Each column constant, columns different: exact only if a group is a column."""
    x = np.broadcast_to(np.arange(32, dtype=np.float16)[None, :] * 3, (8, 32)).copy()
    t = int4.quantize_channels(x)
    assert not t.scales.any() and not t.packed.any()
    np.testing.assert_array_equal(t.zeros, x[0])
    np.testing.assert_array_equal(int4.dequantize_channels(t), x)


def test_per_channel_keeps_the_shape_and_refuses_bad_rows():
    x = np.random.default_rng(2).standard_normal((8, 2, 16)).astype(np.float32)
    t = int4.quantize_channels(x)
    assert (t.tokens, t.channels, t.nbytes) == (8, 32, 8 * 32 // 2 + 4 * 32)
    y = int4.dequantize_channels(t)
    assert y.shape == x.shape and y.dtype == np.float32
    with pytest.raises(ValueError, match="odd"):
        int4.quantize_channels(np.zeros((3, 3), np.float16))
    with pytest.raises(ValueError, match="tokens, channels"):
        int4.quantize_channels(np.zeros(8, np.float16))
    with pytest.raises(ValueError, match="NaN"):
        int4.quantize_channels(np.full((4, 8), np.inf, np.float32))
    with pytest.raises(ValueError, match="exactly 48"):
        int4.unpack_channels_from(np.zeros(47, np.uint8), 4, 8)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    tokens=st.sampled_from([4, 8, 16, 32]),
    channels=st.sampled_from([8, 16, 64]),
    dtype=st.sampled_from([np.float16, np.float32]),
)
def test_every_element_of_a_per_channel_row_is_within_its_bound(data, tokens, channels, dtype):
    elements = st.floats(-1000, 1000, width=16 if dtype == np.float16 else 32)
    x = data.draw(hnp.arrays(dtype, (tokens, channels), elements=elements))
    x_hat = int4.dequantize_channels(int4.quantize_channels(x))
    err = np.abs(x.astype(np.float64) - x_hat.astype(np.float64))
    bound = int4.channel_error_bound(x, x_hat)
    assert (err <= bound).all(), (err - bound).max()
    # and it is not vacuous: half of the channel's step, plus fp16 rounding
    step = (x.astype(np.float32).max(0) - x.astype(np.float32).min(0)) / 15
    assert (bound <= step[None, :] * 0.51 + 2.0**-9 * np.abs(x).max() + 1e-5).all()
