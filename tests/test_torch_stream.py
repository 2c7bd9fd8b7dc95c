"""synapse.stream: weight streaming of torch modules through the skip-end ring (on CPU the
"device" ring is a CPU buffer, so outputs can be compared exactly)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import synapse  # noqa: E402
from synapse.errors import CapacityError  # noqa: E402
from synapse.hw.torch_stream import NoStreamableLayers  # noqa: E402


def snapshot(model):
    return {k: (v.data_ptr(), v.device, v.dtype, v.clone()) for k, v in model.state_dict().items()}


def assert_restored(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, (ptr, dev, dtype, val) in snap.items():
        t = now[k]
        assert (t.data_ptr(), t.device, t.dtype) == (ptr, dev, dtype), k
        assert torch.equal(t, val), k


def mlp_stack(layers=6, width=64, seed=0):
    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)]
    return torch.nn.Sequential(*blocks).eval()


@pytest.mark.parametrize("budget,depth", [(0.3, 2), (0.5, 1), (1.0, 2), ("40KiB", 0)])
def test_sequential_output_equals_resident_and_is_restored(budget, depth):
    m = mlp_stack()
    x = torch.randn(3, 64)
    snap = snapshot(m)
    with torch.no_grad():
        ref = m(x)
        with synapse.stream(m, vram_budget=budget, prefetch_depth=depth, device="cpu") as h:
            outs = [m(x) for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert_restored(m, snap)
    st = h.stats
    assert st["forwards"] == 3 and len(st["per_forward"]) == 3
    assert st["ring_bytes"] + st["resident_bytes"] <= st["budget_bytes"]
    if budget == 1.0:
        assert st["l1_hits"] > 0  # the whole model fits: later passes copy nothing
    else:
        assert st["streamed_bytes"] >= 3 * (st["model_bytes"] - st["resident_bytes"]) * 0.5


def test_transformers_llama_output_equals_resident_and_is_restored():
    pytest.importorskip("transformers")
    from hf_models import tiny_model
    m = tiny_model("llama", layers=4)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    snap = snapshot(m)
    with torch.no_grad():
        ref = m(ids).logits
        ref_gen = m.generate(ids, max_new_tokens=6, do_sample=False)
        h = synapse.stream(m, vram_budget=0.6, prefetch_depth=2, device="cpu")
        out = m(ids).logits
        gen = m.generate(ids, max_new_tokens=6, do_sample=False)
        h.restore()
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)
    assert_restored(m, snap)
    st = h.stats
    assert st["layers"] == 4 and st["forwards"] == 7
    assert st["resident_bytes"] > 0  # embeddings, final norm and head stay resident
    assert all(f["stall_s"] is not None for f in st["per_forward"])


def test_embeddings_can_be_streamed_too():
    pytest.importorskip("transformers")
    from hf_models import tiny_model
    m = tiny_model("llama", layers=2)
    ids = torch.randint(3, 96, (1, 5))
    with torch.no_grad():
        ref = m(ids).logits
        with synapse.stream(m, vram_budget=0.7, device="cpu", pin_embeddings=False) as h:
            out = m(ids).logits
    assert torch.equal(out, ref) and h.stats["layers"] == 4


def test_a_budget_below_the_largest_layer_is_refused_before_any_forward():
    m = mlp_stack()
    snap = snapshot(m)
    with pytest.raises(CapacityError, match=r"below the largest layer \(layer 0: .*33280 bytes\)"):
        synapse.stream(m, vram_budget=20000, device="cpu")
    assert_restored(m, snap)


def test_a_module_without_layers_is_refused():
    with pytest.raises(NoStreamableLayers, match="no streamable layers"):
        synapse.stream(torch.nn.Linear(4, 4), vram_budget="1MiB", device="cpu")


def test_dump_writes_a_runner_result(tmp_path):
    from synapse.results import load_run
    m = mlp_stack()
    with torch.no_grad(), synapse.stream(m, vram_budget=0.4, device="cpu") as h:
        m(torch.randn(1, 64))
    h.dump(tmp_path / "s")
    run = load_run(tmp_path / "s")
    assert run.result["kind"] == "torch_stream" and run.metrics["bytes_h2d"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_equals_resident_and_restores():
    m = mlp_stack(layers=8, width=256).half()
    x = torch.randn(4, 256, dtype=torch.float16)
    snap = snapshot(m)
    with torch.no_grad():
        ref = m.cuda()(x.cuda()).cpu()
        m.cpu()
        snap = snapshot(m)
        with synapse.stream(m, vram_budget=0.3, prefetch_depth=2, device="cuda") as h:
            outs = [m(x.cuda()).cpu() for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert_restored(m, snap)
    st = h.stats
    assert st["effective_gb_per_s"] and st["stall_s"] >= 0
