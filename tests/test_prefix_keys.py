"""Prefix keys: a hash chain over whole chunks, salted per tenant, bound to the model."""

import dataclasses

import numpy as np
import pytest

from synapse.prefix.keys import Fingerprint, chunk_keys, config_digest

FP = Fingerprint("tiny-llama", config_digest({"layers": 2}), "float16", chunk_tokens=4)
TOKENS = np.arange(100, 120)  # five whole chunks


@pytest.mark.parametrize("position", [0, 3, 4, 9, 19])
def test_changing_a_token_changes_the_key_of_its_chunk_and_of_every_later_one(position):
    before = chunk_keys(TOKENS, FP)
    changed = TOKENS.copy()
    changed[position] += 1
    after = chunk_keys(changed, FP)
    first_changed = position // FP.chunk_tokens
    assert after[:first_changed] == before[:first_changed]
    assert all(a != b for a, b in zip(after[first_changed:], before[first_changed:]))


def test_only_whole_chunks_have_keys():
    assert len(chunk_keys(TOKENS[:19], FP)) == 4
    assert len(chunk_keys(TOKENS[:3], FP)) == 0
    assert chunk_keys(TOKENS[:19], FP) == chunk_keys(TOKENS, FP)[:4]


def test_tenants_get_disjoint_keys_and_a_secret_changes_them_all():
    a = chunk_keys(TOKENS, FP, "tenant-a")
    b = chunk_keys(TOKENS, FP, "tenant-b")
    assert not set(a) & set(b)
    assert chunk_keys(TOKENS, FP, "tenant-a") == a
    assert not set(chunk_keys(TOKENS, FP, "tenant-a", secret=b"s3cret")) & set(a)


@pytest.mark.parametrize("field,value", [("model_id", "other"), ("config_hash", "x"),
                                         ("dtype", "bfloat16"), ("kv_layout", "head-major"),
                                         ("kv_format", "int4-g64"), ("format_version", 2)])
def test_every_fingerprint_field_separates_the_key_spaces(field, value):
    other = dataclasses.replace(FP, **{field: value})
    assert not set(chunk_keys(TOKENS, other)) & set(chunk_keys(TOKENS, FP))


def test_a_different_chunk_size_gives_different_keys_for_the_same_tokens():
    eight = dataclasses.replace(FP, chunk_tokens=8)
    assert not set(chunk_keys(TOKENS, eight)) & set(chunk_keys(TOKENS, FP))


def test_lists_numpy_and_torch_tokens_hash_alike():
    torch = pytest.importorskip("torch")
    want = chunk_keys(TOKENS, FP)
    assert chunk_keys(TOKENS.tolist(), FP) == want
    assert chunk_keys(TOKENS.astype(np.int32), FP) == want
    assert chunk_keys(torch.tensor(TOKENS), FP) == want


def test_bad_tokens_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="1-D"):
        chunk_keys(np.zeros((2, 4), np.int64), FP)
    with pytest.raises(ValueError, match="integer"):
        chunk_keys(np.zeros(8, np.float32), FP)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Fingerprint("m", chunk_tokens=0)
