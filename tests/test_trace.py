"""Attention traces: captured from a tiny random model, replayed on the simulator with the
same decisions as the live TieredCache run."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from synapse.errors import ScenarioError  # noqa: E402
from synapse.hf import TieredCache  # noqa: E402
from synapse.hw.kv_layout import KVLayout  # noqa: E402
from synapse.trace_capture import capture  # noqa: E402
from synapse.workloads.trace import Trace  # noqa: E402

BT, PROMPT, CHUNK, DECODE = 16, 96, 32, 40


def model64(seed=0):
    """A tiny Llama with head_dim 64 (the scenario schema's model shapes are 64 or 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    m = model64()
    ids = torch.randint(3, 96, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    tr = capture(m, ids, decode_steps=DECODE, block_tokens=BT, prefill_chunk=CHUNK)
    path = tr.save(tmp_path_factory.mktemp("trace") / "t.npz")
    return m, tr, path


def scenario_file(tmp_path, trace_path, budget_blocks, policy="h2o", demote="l2", layers=2):
    layout = KVLayout(layers, 1, 64, BT, 64)
    text = f"""
name: tiny-trace
kind: trace
model: {{layers: {layers}, kv_heads: 1, head_dim: 64}}
memory: {{block_tokens: {BT}, l1_budget: {budget_blocks * layout.fp16_bytes}, int4_group: 64}}
policy: {{eviction: {policy}, demote: {demote}}}
workload: {{trace: {trace_path.name}}}
"""
    p = tmp_path / "trace.yaml"
    p.write_text(text)
    (tmp_path / trace_path.name).write_bytes(trace_path.read_bytes())
    return p


def test_a_trace_records_masses_per_step_and_block(captured, tmp_path):
    _, tr, path = captured
    back = Trace.load(path)
    assert back.header["model"] == {"model_type": "llama", "layers": 2, "kv_heads": 1,
                                    "head_dim": 64, "dtype": "float32"}
    assert back.steps == PROMPT // CHUNK + DECODE
    assert back.tokens[-1] == PROMPT + DECODE and back.mass.shape == (back.steps, 9)
    # every step's masses over the blocks present sum to 1 (each layer's do, and the mean)
    np.testing.assert_allclose(back.mass.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(back.mass, tr.mass) and len(back.token_ids) == PROMPT + DECODE


@pytest.mark.parametrize("policy", ["h2o", "lru", "fifo"])
def test_replay_on_the_simulator_makes_the_live_decisions(captured, tmp_path, policy):
    """Live: the same model and tokens through a TieredCache of 5 blocks of 16 tokens (demote l2, so
    attention is unchanged and the masses are the captured ones). Replay: the trace on
    the simulator with the same policy and budget. The decision streams (step, action,
    block ids) must be identical, and there must be evictions to compare."""
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    m, tr, path = captured
    cache = TieredCache(m.config, policy=policy, l1_budget_tokens=5 * BT, demote="l2",
                        block_tokens=BT, model=m)
    ids = torch.as_tensor(tr.token_ids)[None]
    with torch.no_grad():
        for i in range(0, PROMPT, CHUNK):
            m(ids[:, i:i + CHUNK], past_key_values=cache, use_cache=True)
        for i in range(PROMPT, PROMPT + DECODE - 1):
            m(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    # the capture fed its last generated token too: one more step
    with torch.no_grad():
        m(ids[:, -1:], past_key_values=cache, use_cache=True)
    live = cache.decisions()
    yaml_path = str(scenario_file(tmp_path, path, 5, policy))
    run = run_scenario(load_scenario(yaml_path), "sim", yaml_path)  # the trace path is relative
    assert [a for _, a, _ in live].count("demote") > 3
    assert run.decisions == live
    assert run.metrics["l2_hits"] == cache.telemetry()["l2_hits"]


def test_a_trace_of_another_model_shape_is_refused_naming_both(captured, tmp_path):
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    _, _, path = captured
    yaml_path = str(scenario_file(tmp_path, path, 5, layers=4))
    with pytest.raises(ScenarioError, match=r"expected layers=4, kv_heads=1, head_dim=64, "
                                            r"block_tokens=16 .* found layers=2, kv_heads=1"):
        run_scenario(load_scenario(yaml_path), "sim", yaml_path)


def test_cli_capture_writes_a_trace(tmp_path):
    from click.testing import CliRunner

    from synapse.cli import main
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 64}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["trace", "capture", "--model-config", str(tmp_path / "cfg.json"),
                                  "--random-init", "--prompt-tokens", "32", "--decode-steps", "4",
                                  "--block-tokens", "8", "-o", str(tmp_path / "t.npz")])
    assert r.exit_code == 0, r.output
    assert "5 steps, 5 blocks of 8 tokens" in r.output
    assert Trace.load(tmp_path / "t.npz").model["layers"] == 2
