"""kvpress's presses on the models and prompts of ``kv_quality.py``, in kvpress's own venv.

Run by ``kv_quality.py`` (not by hand) with the Python of a venv holding kvpress 0.5.5
and a transformers it accepts (< 5.3): ``python kv_quality_kvpress.py --spec SPEC --out DIR``.
SPEC is the JSON ``kv_quality.py`` wrote (models: config keyword arguments and a
safetensors file of weights saved from the main venv; prompts; budgets). It writes
``DIR/kvpress.json`` (versions, per run: kept tokens, KV bytes, needle retention, or why it
did not run) and ``DIR/kvpress.safetensors`` (per run: greedy tokens and logits, and the logits when the
reference's greedy tokens are fed instead: teacher forcing), which
``kv_quality.py`` compares with its own reference.

Protocol, that of kvpress's ``KVPressTextGenerationPipeline._forward`` (kvpress/pipeline.py):
the context (prompt minus its question) is prefilled by the base model under the press,
which prunes each layer's KV as the prefill leaves that layer; the question and then each
greedy token are fed with explicit ``position_ids`` counting from the uncompressed
context length. ``dynamic`` is the same loop with no press: this venv's reference.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PRESSES = ("dynamic", "observed_attention", "streaming_llm", "snapkv")


def make_press(name: str, ratio: float, n_sink: int):
    import kvpress
    if name == "dynamic":
        return None
    if name == "observed_attention":
        return kvpress.ObservedAttentionPress(compression_ratio=ratio)
    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=n_sink)
    return kvpress.SnapKVPress(compression_ratio=ratio)  # window 64, kernel 5: the defaults


def press_settings(press) -> dict:
    import dataclasses
    return {} if press is None else {"class": type(press).__name__, **dataclasses.asdict(press)}


def ratio_for(context: int, keep: int) -> float:
    """The compression_ratio for which ScorerPress keeps exactly ``keep`` of ``context``
    tokens (it keeps ``int(context * (1 - ratio))``)."""
    r = (context - keep) / context
    while int(context * (1 - r)) < keep:
        r -= 1e-12
    return r


def run_one(model, ids, context: int, new_tokens: int, press, forced=None):
    """Greedy tokens (or, given ``forced``, the logits when those tokens are fed)."""
    import torch
    from transformers import DynamicCache
    from hf_caches import held_kv_bytes
    from kv_quality_shared import KeyProbe
    cache = DynamicCache()
    probe = KeyProbe(cache)
    device = ids.device
    # Registered before the press's own hooks, so these run first: they see each layer's
    # KV of the whole context before it is pruned (the prefill's peak).
    prefill_held = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda *_: prefill_held.append(held_kv_bytes(cache, device))) for layer in model.model.layers]
    with torch.no_grad():
        try:
            with press(model) if press is not None else contextlib.nullcontext():
                model.model(input_ids=ids[:, :context], past_key_values=cache)
        finally:
            for h in hooks:
                h.remove()
        kept_context = cache.get_seq_length()
        pos = torch.arange(context, ids.shape[1]).unsqueeze(0)
        out = model(input_ids=ids[:, context:], past_key_values=cache, position_ids=pos)
        logits = [out.logits[0, -1].float()]
        tokens = [int(logits[-1].argmax())]
        held = [held_kv_bytes(cache, device)]
        nxt = ids.shape[1]
        for i in range(new_tokens - 1):
            feed = int(forced[i]) if forced is not None else tokens[-1]
            out = model(input_ids=torch.tensor([[feed]]), past_key_values=cache,
                        position_ids=torch.tensor([[nxt]]))
            nxt += 1
            logits.append(out.logits[0, -1].float())
            tokens.append(int(logits[-1].argmax()))
            held.append(held_kv_bytes(cache, device))
    meta = {"kept_context_tokens": int(kept_context),
            "kept_tokens_end": int(cache.get_seq_length()),
            "keys_seen_last_step": probe.keys_seen[-1],
            "kv_held_peak_bytes": max(held), "kv_held_end_bytes": held[-1],
            "prefill_peak_bytes": max(prefill_held)}
    return meta, torch.tensor(tokens), torch.stack(logits), probe.last_keys


def needle_test_status() -> str:
    """kvpress's own needle-in-a-haystack, tried as far as it goes offline."""
    import importlib.util
    parts = []
    if importlib.util.find_spec("evaluation") is None:
        parts.append("its needle_in_haystack benchmark lives in the kvpress repository's "
                     "evaluation/ folder, which the kvpress wheel does not install")
    try:
        from datasets import load_dataset
        load_dataset("alessiodevoto/paul_graham_essays", split="test")
        parts.append("the haystack dataset loaded")
    except Exception as e:  # noqa: BLE001 (the reason is the result)
        parts.append(f"its haystack, the Hugging Face dataset alessiodevoto/paul_graham_essays "
                     f"(evaluation/evaluate_registry.py), cannot be loaded offline: "
                     f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    parts.append("it tokenizes text with the model's tokenizer and scores the answer "
                 "with ROUGE against the needle sentence, which needs a pretrained model; "
                 "a random one here has neither a tokenizer nor any retrieval to score")
    return "not run: " + "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, required=True, help="the spec JSON kv_quality.py wrote")
    ap.add_argument("--out", type=Path, required=True, help="folder for kvpress.json and .safetensors")
    a = ap.parse_args(argv)
    try:
        spec = json.loads(a.spec.read_text())
    except (OSError, ValueError) as e:
        print(f"{a.spec}: cannot read the spec: {e}", file=sys.stderr)
        return 2
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from kv_quality_shared import build_model, needle_retention
    torch.set_num_threads(spec["threads"])
    res = {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": transformers.__version__, "kvpress": md.version("kvpress")},
           "needle_test": needle_test_status(), "runs": {}}
    tensors = {}
    for mkey, m in spec["models"].items():
        model = build_model(m["family"], m["config"], state_dict=load_file(m["weights"]))
        for pkey, p in spec["prompts"].items():
            ids = torch.tensor([p["ids"]])
            context = p["context_tokens"]
            # held at the last forward pass: the kept context, the question and all new
            # tokens but the last (never fed back): the budget, as TieredCache's L1 peak
            keep = spec["budget_tokens"] - (len(p["ids"]) - context) - (spec["new_tokens"] - 1)
            ratio = ratio_for(context, keep)
            ref_keys = ref_tokens = None
            for name in PRESSES:
                key = f"{mkey}/{pkey}/{name}"
                press = make_press(name, ratio, spec["block_tokens"])
                entry = {"settings": press_settings(press)}
                try:
                    meta, tokens, logits, _ = run_one(model, ids, context, spec["new_tokens"], press)
                    if name == "dynamic":
                        ref_tokens = tokens  # the tokens every run is then forced with
                    if ref_tokens is None:
                        raise RuntimeError("no reference tokens: the dynamic run failed")
                    meta, _, forced_logits, keys = run_one(model, ids, context, spec["new_tokens"],
                                                           press, forced=ref_tokens)
                except Exception as e:  # noqa: BLE001 (recorded; the other presses run)
                    entry["status"] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    res["runs"][key] = entry
                    continue
                if name == "dynamic":
                    ref_keys = keys
                if p["needle"] and ref_keys is not None:
                    meta["needle_retention"] = needle_retention(ref_keys, keys, *p["needle"])
                entry.update(status="ok", **meta)
                res["runs"][key] = entry
                tensors[f"{key}/tokens"] = tokens
                tensors[f"{key}/logits"] = logits
                tensors[f"{key}/forced_logits"] = forced_logits
            print(f"kvpress: {mkey} {pkey} done", file=sys.stderr, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out / "kvpress.safetensors"))
    (a.out / "kvpress.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
