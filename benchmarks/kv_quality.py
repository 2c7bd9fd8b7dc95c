"""KV cache quality side by side: TieredCache, transformers' QuantizedCache and kvpress.

Tiny random Llama and Qwen2 models (built from configs in ``kv_quality_shared.py``,
seeded, no download; fp32, eager attention, CPU) at two initialisation scales
(``initializer_range`` 0.02, transformers' default, and 0.2, whose attention is peaky),
on the same prompts (``--random-prompts`` of random ids, plus a needle prompt: a needle of
16 ids at half depth, asked for again at the end), decode ``--new-tokens`` greedy tokens
with each cache; every one is compared with ``DynamicCache`` on the same model and prompt:

- ``tiered_<policy>_<demote>``: ``TieredCache(config, policy=..., l1_budget_tokens=B,
  demote=..., block_tokens=16, backend="cpu", model=model, pass_over_budget="hold")`` for
  policy h2o / lru / sinks and demote l2 / int4 / drop; B = ``--budget`` (25%) of the
  context (prompt + new tokens), in whole blocks. The prompt goes in one forward pass, as
  for ``DynamicCache``, QuantizedCache and kvpress: its tokens attend to the whole
  prompt at full precision (the pass's KV of every layer held on the device for the pass:
  ``prefill_peak_bytes``), then it is stored one block per planner step, the policy
  choosing at every block with that block's queries' attention (``synapse.hf.held_pass``).
  ``tiered_<policy>_int4_prefill16``: the prompt fed one block per forward pass instead
  (``prefill_chunk_size=16``, TieredCache's default ``pass_over_budget="refuse"``), so
  the device never holds more than B tokens of KV, and the later prompt tokens attend to
  the blocks already demoted to INT4.
  ``tiered_full`` (fifo, a budget above the context) is the control: it must equal
  ``DynamicCache`` token for token and logit for logit. The INT4 rows come in both key
  formats: ``tiered_<policy>_int4`` with ``int4_keys="channel"`` (keys per channel over a
  block's 16 tokens, values per token: KIVI's split) and ``tiered_<policy>_int4_token``
  (keys per token, the format before it); both report their INT4 bits per element.
- ``quanto``, ``hqq``: ``QuantizedCache`` at 4 bits, group 64, residual 128 (the settings
  of ``hf_caches.py``; extras ``optimum-quanto`` 0.2.7, ``hqq`` 0.2.8), the prompt in one
  forward pass; ``quanto_prefill16``, ``hqq_prefill16``: the same, fed the prompt one
  block per pass as TieredCache is (its later prompt tokens then attend to quantized
  states, as ``tiered_<policy>_int4_prefill16``'s do).
- ``kvpress_<press>``: NVIDIA kvpress 0.5.5's ObservedAttentionPress (H2O's score),
  StreamingLLMPress (sinks; ``n_sink`` = 16 = TieredCache's one sink block) and
  SnapKVPress (window 64, kernel 5), run by ``kv_quality_kvpress.py`` in a venv of their
  own (kvpress needs transformers < 5.3) on the same weights (saved once with
  safetensors) and prompts, and compared with that venv's own ``DynamicCache`` run;
  ``kvpress_reference`` compares that reference with this one.

Same device memory: the eviction methods are matched by the number of tokens they may
keep, which at fp32 and one layout is the same bytes: TieredCache's L1 holds at most B
tokens (its measured peak is B); each press keeps ``B - question - (new tokens - 1)`` of
the context, so that at its last forward pass it holds B tokens too (kvpress compresses
the context at prefill only; the question and the new tokens are appended). With its
default watermarks TieredCache drops down to 85% of B whenever B is crossed, so it
attends to fewer tokens than the presses; the ``tiered_<policy>_drop_wm1`` rows
(``high_watermark=low_watermark=1.0``) use all of B. QuantizedCache
keeps every token (4-bit ones and a full-precision window), so it is matched by bits, not
memory. Every row reports the KV bytes it holds, measured on its tensors after every
token: peak and at the end (TieredCache: its L1 blocks only; its L2 blocks are host memory).
The one-pass prompt holds more for a moment (``prefill_peak_bytes``): kvpress each
layer's KV of the whole context before the press prunes it (sampled as each layer's
attention returns); TieredCache the prompt's KV of every layer until the pass ends,
besides its L1 (its ``pass_peak_bytes``: which blocks stay in L1 depends on every
layer's attention). QuantizedCache quantizes each layer's prompt KV as that layer runs
and keeps no full-precision copy of it; the ``_prefill16`` rows hold their storage only.
TieredCache's attention is dense over what it keeps: ``l2`` and ``int4`` read demoted
blocks back for every step, so only ``drop`` loses tokens.

Measured per run: greedy agreement with the reference (``prefix_match``: the fraction of
tokens before the first divergence; ``overall_match``: position by position) and the
logits error over the steps whose inputs are still identical (through the first
divergent token): max abs and relative to the reference's largest logit magnitude;
the number of keys layer 0's attention saw at the last step; on the needle prompt,
``needle_retention`` (the fraction of needle positions x KV heads whose layer-0 key that
attention saw) and the reference's attention share on the needle.

    .venv/bin/pip install -e '.[quality]'                 # optimum-quanto, hqq
    python benchmarks/kv_quality.py --setup-kvpress \\
        --out benchmarks/results/cpu-2026-12-01/kv_quality.json      # ~9 min on 2 cores
    python benchmarks/kv_quality.py --tiny --no-kvpress    # a dry run, seconds

``--setup-kvpress`` creates ``.venv-kvpress`` (git-ignored) with ``KVPRESS_PINS`` when it
is missing; without it, a missing venv is recorded as the reason kvpress did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from kv_quality_shared import FAMILIES, INITS  # noqa: E402

POLICIES = ("h2o", "lru", "sinks")
DEMOTES = ("l2", "int4", "drop")
QUANT = dict(nbits=4, q_group_size=64, residual_length=128)
PRESSES = ("observed_attention", "streaming_llm", "snapkv")
BLOCK_TOKENS = 16
QUESTION_TOKENS = 8
NEEDLE_TOKENS = 16
SEED = 0
KVPRESS_PINS = ("torch==2.13.0", "kvpress==0.5.5", "transformers==5.2.0")
KVPRESS_VENV = ROOT / ".venv-kvpress"


# -- the caches of this venv -----------------------------------------------------------
def budget_tokens(context: int, fraction: float) -> int:
    return max(2 * BLOCK_TOKENS, int(context * fraction) // BLOCK_TOKENS * BLOCK_TOKENS)


def cache_specs(context: int, budget: int) -> dict:
    """name -> (settings, factory(model) -> cache, prefill_chunk or None)."""
    from transformers import DynamicCache, QuantizedCache
    from synapse.hf import TieredCache
    # The _prefill16 rows: one block per prefill pass, so that the policy scores and
    # chooses at every block. With the largest chunk that fits (budget - 1 block) each
    # chunk evicts nearly all that is older, and h2o and lru then keep the same blocks
    # (measured: identical figures). A held one-pass prompt is stored one block per step.
    chunk = BLOCK_TOKENS
    held = {"pass_over_budget": "hold"}
    full = (context // BLOCK_TOKENS + 2) * BLOCK_TOKENS * 2  # far above the high watermark

    def tiered(policy, l1, demote, **extra):
        def make(model):
            return TieredCache(model.config, policy=policy, l1_budget_tokens=l1, demote=demote,
                               block_tokens=BLOCK_TOKENS, backend="cpu", model=model, **extra)
        return ({"policy": policy, "l1_budget_tokens": l1, "demote": demote,
                 "block_tokens": BLOCK_TOKENS, **extra}, make)

    specs = {"dynamic": ({}, lambda m: DynamicCache(config=m.config), None),
             "tiered_full": (*tiered("fifo", full, "l2"), None)}
    for p in POLICIES:
        for d in DEMOTES:
            extra = {"int4_keys": "channel"} if d == "int4" else {}
            specs[f"tiered_{p}_{d}"] = (*tiered(p, budget, d, **extra, **held), None)
        specs[f"tiered_{p}_int4_token"] = (*tiered(p, budget, "int4", int4_keys="token",
                                                   **held), None)
        specs[f"tiered_{p}_int4_prefill{chunk}"] = (*tiered(p, budget, "int4",
                                                            int4_keys="channel"), chunk)
    # The default watermarks (0.95 / 0.85) drop down to 85% of the budget as soon as it
    # is crossed; at 1.0 / 1.0 a drop happens only when a new block does not fit, so the
    # whole budget is used, as by the presses (and, for sinks, as by StreamingLLM).
    for p in POLICIES:
        specs[f"tiered_{p}_drop_wm1"] = (*tiered(p, budget, "drop", high_watermark=1.0,
                                                 low_watermark=1.0, **held), None)
    # axis 0 for quanto, 1 for HQQ: the axes transformers' KV cache docs give for each
    specs["quanto"] = ({**QUANT, "axis_key": 0, "axis_value": 0},
                       lambda m: QuantizedCache(backend="quanto", config=m.config, axis_key=0,
                                                axis_value=0, **QUANT), None)
    specs["hqq"] = ({**QUANT, "axis_key": 1, "axis_value": 1},
                    lambda m: QuantizedCache(backend="hqq", config=m.config, axis_key=1,
                                             axis_value=1, **QUANT), None)
    # The same caches fed the prompt as TieredCache is, one block per forward pass: their
    # later prompt tokens then attend to quantized keys and values too (in one pass the
    # prefill attends to full precision and quantizes afterwards), so these rows separate
    # the quantization format from the prefill schedule.
    for name in ("quanto", "hqq"):
        specs[f"{name}_prefill{chunk}"] = (specs[name][0], specs[name][1], chunk)
    return specs


def needle_attention_share(model, ids, lo: int, hi: int, question: int) -> dict:
    """Attention the reference pays to the needle from the question's queries (mean over
    layers, heads and those queries), and what a uniform attention would pay."""
    import torch
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    rows = torch.arange(ids.shape[1] - question, ids.shape[1])
    share = torch.stack([a[0, :, rows, lo:hi].sum(-1).mean() for a in att]).mean()
    uniform = ((hi - lo) / (rows + 1).float()).mean()
    return {"needle_attention_share": float(share), "uniform_share": float(uniform)}


def teacher_forced(model, ids, cache, tokens, chunk) -> list:
    """Logits of every step when the cache is fed the prompt (in ``chunk``-token passes)
    and then ``tokens`` (the reference's greedy tokens), whatever it would have chosen."""
    import torch
    logits = []
    with torch.no_grad():
        step = chunk or ids.shape[1]
        for lo in range(0, ids.shape[1], step):
            out = model(ids[:, lo:lo + step], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1].float())
        for t in tokens[:-1].tolist():
            out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
    return logits


def forced_agreement(ref: list, got: list) -> dict:
    """Teacher forcing: every step's inputs are the reference's, so every step compares."""
    import torch
    ref_t, got_t = torch.stack(ref), torch.stack(got)
    diff = (ref_t - got_t).abs().amax(dim=-1)
    scale = ref_t.abs().amax(dim=-1)
    return {"top1_match": float((ref_t.argmax(-1) == got_t.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float(diff.max()),
            "max_rel_logit_diff": float(diff.max() / scale.max()),
            "mean_rel_logit_diff": float((diff / scale).mean())}


def run_cache(name, spec, model, ids, new_tokens, prompt, ref) -> tuple[dict, dict]:
    """Greedy generation, then teacher forcing on the reference's tokens (``ref`` None:
    this is the reference, forced on its own greedy tokens)."""
    from hf_caches import agreement, generate_once, release
    from kv_quality_shared import KeyProbe, needle_retention
    settings, make, chunk = spec
    entry = {"settings": settings, "prefill_chunk": chunk}
    t0 = time.perf_counter()
    cache = make(model)
    try:
        got = generate_once(model, ids, cache, new_tokens, chunk, measure=True)
        tel = cache.telemetry() if hasattr(cache, "telemetry") else None
    finally:
        release(cache, ids.device)
    cache = make(model)
    probe = KeyProbe(cache)
    try:
        got["forced_logits"] = teacher_forced(model, ids, cache, (ref or got)["tokens"], chunk)
        kept = cache.kept_tokens() if hasattr(cache, "kept_tokens") else None
        # generate_once's step hook restarts a TieredCache's peaks when the prompt ends;
        # this run's are the whole run's, the prompt fed the same way
        pass_peak = getattr(cache, "pass_peak_bytes", 0)
    finally:
        release(cache, ids.device)
    got["keys"] = probe.last_keys
    # TieredCache samples its L1 after every layer's update and move, more often than the
    # per-token walk of generate_once (which sees it between steps only)
    peak = max(got["kv_held_peak_bytes"], (tel or {}).get("l1_peak_bytes") or 0)
    entry.update(status="ok", run_s=time.perf_counter() - t0, kv_held_peak_bytes=peak,
                 kv_held_end_bytes=got["kv_held_end_bytes"],
                 keys_seen_last_step=probe.keys_seen[-1])
    if kept is not None:
        entry["kept_tokens_end"] = kept
    if pass_peak > peak:  # a prompt pass held beyond the budget
        entry["prefill_peak_bytes"] = pass_peak
    shape = getattr(cache, "shape", None)
    if shape is not None and settings.get("demote") == "int4":
        entry["int4_bits_per_element"] = 8 * shape.int4_bytes / shape.numel
    if tel is not None:
        entry["telemetry"] = {k: tel.get(k) for k in (
            "l1_budget_tokens", "l1_budget_bytes", "l1_peak_bytes", "evictions", "demotions",
            "drops", "fetches", "prefetches", "bytes_h2d", "bytes_d2h", "int4_rel_rmse",
            "pass_peak_bytes")}
    if ref is not None:
        entry["agreement"] = agreement(ref, got)
        entry["forced"] = forced_agreement(ref["forced_logits"], got["forced_logits"])
        if prompt["needle"]:
            entry["needle_retention"] = needle_retention(ref["keys"], got["keys"], *prompt["needle"])
    return entry, got


def quant_missing(name: str) -> str | None:
    from hf_caches import backend_missing
    return backend_missing(name)


# -- kvpress, in its own venv -----------------------------------------------------------
def setup_kvpress(python: Path) -> str | None:
    """Create ``.venv-kvpress`` with KVPRESS_PINS; None, or why it failed."""
    venv = python.parents[1]
    print(f"creating {venv} ({' '.join(KVPRESS_PINS)})", file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", *KVPRESS_PINS]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return f"`{' '.join(cmd)}` failed (exit {r.returncode}): {tail[0][:300]}"
    return None


def run_kvpress(python: Path, spec_path: Path, out_dir: Path, timeout_s: float) -> dict:
    """The runner's JSON and tensors, or {"status": "not run: <why>"}."""
    if not python.exists():
        return {"status": f"not run: no kvpress venv at {python.parents[1]} (create it with "
                          f"--setup-kvpress, or pass --kvpress-python)"}
    cmd = [str(python), str(HERE / "kv_quality_kvpress.py"), "--spec", str(spec_path),
           "--out", str(out_dir)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"not run: the kvpress runner took more than {timeout_s:.0f} s"}
    if r.returncode:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()] or ["(no output)"]
        return {"status": f"not run: the kvpress runner exited {r.returncode}: {lines[-1][:400]}"}
    from safetensors.torch import load_file
    res = json.loads((out_dir / "kvpress.json").read_text())
    res["tensors"] = load_file(str(out_dir / "kvpress.safetensors"))
    res["status"] = "ok"
    res["run_s"] = time.perf_counter() - t0
    return res


def merge_kvpress(kv: dict, results: dict) -> None:
    """Compare each press with the kvpress venv's own DynamicCache run, and that run with
    this venv's reference; entries go into ``results[model][prompt]``."""
    from hf_caches import agreement
    t = kv.get("tensors", {})
    for mkey, prompts in results.items():
        for pkey, caches in prompts.items():
            base = f"{mkey}/{pkey}"
            ours = caches.pop("_ref")
            if kv["status"] != "ok":
                for press in PRESSES:
                    caches[f"kvpress_{press}"] = {"status": kv["status"]}
                continue
            ref_meta = kv["runs"].get(f"{base}/dynamic", {})
            if ref_meta.get("status") != "ok":
                for press in PRESSES:
                    caches[f"kvpress_{press}"] = {"status": f"not run: the kvpress venv's "
                                                            f"reference failed: {ref_meta.get('status')}"}
                continue
            def run(name):
                k = f"{base}/{name}"
                return {"tokens": t[f"{k}/tokens"], "tokens_all": t[f"{k}/tokens"][None],
                        "logits": list(t[f"{k}/logits"]),
                        "forced_logits": list(t[f"{k}/forced_logits"])}

            ref = run("dynamic")
            caches["kvpress_reference"] = {
                **ref_meta, "agreement": agreement(ours, ref),
                "forced": forced_agreement(ours["forced_logits"], ref["forced_logits"])}
            for press in PRESSES:
                meta = kv["runs"].get(f"{base}/{press}", {"status": "not run: missing"})
                entry = dict(meta)
                if meta.get("status") == "ok":
                    got = run(press)
                    entry["agreement"] = agreement(ref, got)
                    entry["forced"] = forced_agreement(ref["forced_logits"], got["forced_logits"])
                caches[f"kvpress_{press}"] = entry


# -- summary -----------------------------------------------------------------------------
def control_check(results: dict) -> str:
    """``tiered_full`` keeps everything: its tokens and logits must be DynamicCache's."""
    bad = [f"{m}/{p}" for m, ps in results.items() for p, c in ps.items()
           if (c["tiered_full"].get("agreement") or {}).get("max_abs_logit_diff", 1.0) != 0.0
           or c["tiered_full"]["agreement"]["overall_match"] != 1.0]
    return "ok: tiered_full equals DynamicCache bit for bit on every model and prompt" if not bad \
        else f"FAILED: tiered_full differs from DynamicCache on {', '.join(bad)}"


def summarize(results: dict) -> dict:
    """Per model and cache: agreement and mean errors averaged over the prompts, max
    errors maxed, KV bytes and keys the largest seen."""
    out = {}
    for mkey, prompts in results.items():
        rows = {}
        names = list(next(iter(prompts.values())).keys())
        for name in names:
            entries = [p[name] for p in prompts.values() if name in p]
            ok = [e for e in entries if e.get("status") == "ok"]
            if not ok:
                rows[name] = {"status": entries[0].get("status")}
                continue
            ags = [e["agreement"] for e in ok if e.get("agreement")]
            row = {"status": "ok", "prompts": len(ok),
                   "kv_held_peak_bytes": max(e["kv_held_peak_bytes"] for e in ok),
                   "kv_held_end_bytes": max(e["kv_held_end_bytes"] for e in ok),
                   "keys_seen_last_step": max(e["keys_seen_last_step"] for e in ok)}
            if ags:
                row.update(
                    prefix_match=statistics.mean(a["prefix_match"] for a in ags),
                    overall_match=statistics.mean(a["overall_match"] for a in ags),
                    max_abs_logit_diff=max(a["max_abs_logit_diff"] for a in ags),
                    max_rel_logit_diff=max(a["max_rel_logit_diff"] or 0.0 for a in ags))
            forced = [e["forced"] for e in ok if e.get("forced")]
            if forced:
                row.update(
                    forced_top1_match=statistics.mean(f["top1_match"] for f in forced),
                    forced_max_rel_logit_diff=max(f["max_rel_logit_diff"] for f in forced),
                    forced_mean_rel_logit_diff=statistics.mean(f["mean_rel_logit_diff"] for f in forced))
            if any("prefill_peak_bytes" in e for e in ok):
                row["prefill_peak_bytes"] = max(e["prefill_peak_bytes"] for e in ok)
            needle = [e["needle_retention"] for e in ok if "needle_retention" in e]
            if needle:
                row["needle_retention"] = needle[0]
            bits = [e["int4_bits_per_element"] for e in ok if "int4_bits_per_element" in e]
            if bits:
                row["int4_bits_per_element"] = bits[0]
            rows[name] = row
        out[mkey] = rows
    return out


def fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def print_tables(summary: dict) -> None:
    head = ["cache", "KV peak KiB", "keys seen", "prefix", "overall", "max|dlogit|", "rel",
            "TF top1", "TF rel max", "TF rel mean", "needle"]
    for mkey, rows in summary.items():
        print(f"\n{mkey}")
        table, notes = [], []
        for name, r in rows.items():
            if r["status"] != "ok":
                notes.append(f"  {name}: {r['status']}")
                continue
            table.append([name, f"{r['kv_held_peak_bytes'] / 1024:.0f}", str(r["keys_seen_last_step"]),
                          fmt(r.get("prefix_match"), ".3f"), fmt(r.get("overall_match"), ".3f"),
                          fmt(r.get("max_abs_logit_diff"), ".2e"), fmt(r.get("max_rel_logit_diff"), ".3f"),
                          fmt(r.get("forced_top1_match"), ".3f"),
                          fmt(r.get("forced_max_rel_logit_diff"), ".3f"),
                          fmt(r.get("forced_mean_rel_logit_diff"), ".3f"),
                          fmt(r.get("needle_retention"), ".2f")])
        widths = [max(len(row[i]) for row in table + [head]) for i in range(len(head))]
        for row in [head] + table:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        for n in notes:
            print(n)


DOC_ROWS = ("tiered_full", "tiered_h2o_l2", "tiered_h2o_int4", "tiered_lru_int4",
            "tiered_sinks_int4", "tiered_h2o_int4_token", "tiered_lru_int4_token",
            "tiered_sinks_int4_token", f"tiered_h2o_int4_prefill{BLOCK_TOKENS}",
            f"tiered_lru_int4_prefill{BLOCK_TOKENS}", f"tiered_sinks_int4_prefill{BLOCK_TOKENS}",
            "quanto", "hqq", f"quanto_prefill{BLOCK_TOKENS}",
            f"hqq_prefill{BLOCK_TOKENS}", "tiered_h2o_drop", "tiered_lru_drop",
            "tiered_sinks_drop", "tiered_h2o_drop_wm1", "tiered_lru_drop_wm1",
            "tiered_sinks_drop_wm1", "kvpress_observed_attention", "kvpress_streaming_llm",
            "kvpress_snapkv")


def markdown_table(summary: dict) -> str:
    """docs/hf.md's table: per model, teacher-forced top-1 / mean relative logits error
    (greedy prefix match)."""
    models = list(summary)
    lines = ["| cache | KV on device, peak KiB | keys at the last step | "
             + " | ".join(models) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for name in DOC_ROWS:
        rows = [summary[m].get(name, {}) for m in models]
        if not any(r.get("status") == "ok" for r in rows):
            lines.append(f"| `{name}` | {rows[0].get('status', 'not run')} |" + " |" * (len(models) + 1))
            continue
        first = next(r for r in rows if r.get("status") == "ok")
        held = max((r.get("prefill_peak_bytes", 0) for r in rows), default=0)
        peak = f"{first['kv_held_peak_bytes'] / 1024:.0f}" + (
            f" ({held / 1024:.0f} in the prompt's pass)" if held else "")
        cells = [f"{r['forced_top1_match']:.2f} / {r['forced_mean_rel_logit_diff']:.3f} "
                 f"({r['prefix_match']:.2f})" if r.get("status") == "ok" else "not run" for r in rows]
        lines.append(f"| `{name}` | {peak} | "
                     f"{first['keys_seen_last_step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------
def machine() -> dict:
    """hf_caches' versions (python, torch, transformers, quanto, hqq, commit) plus the CPU."""
    import torch
    from hf_caches import versions
    v = versions(torch.device("cpu"))
    v["cpu_model"] = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                v["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return v


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default $OUT/kv_quality.json or ./kv_quality.json)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--inits", default=",".join(INITS),
                    help="comma list of " + ", ".join(f"{k} ({v})" for k, v in INITS.items()))
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 512, 192 with --tiny")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32, 8 with --tiny")
    ap.add_argument("--random-prompts", type=int, default=None, help="default 3, 1 with --tiny")
    ap.add_argument("--budget", type=float, default=0.25,
                    help="TieredCache's L1 budget (and kvpress's kept tokens) as a fraction of "
                         "the context; default 0.25")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the figures then do not depend on the "
                         "machine's core count, and runs beside other work do not oversubscribe)")
    ap.add_argument("--tiny", action="store_true", help="short prompts: a dry run in seconds")
    ap.add_argument("--no-kvpress", action="store_true", help="skip the kvpress runs")
    ap.add_argument("--setup-kvpress", action="store_true",
                    help=f"create {KVPRESS_VENV.name} ({' '.join(KVPRESS_PINS)}) if it is missing")
    ap.add_argument("--kvpress-python", type=Path, default=KVPRESS_VENV / "bin" / "python",
                    help="the Python of the kvpress venv")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "kv_quality",
                    help="weights, spec and the kvpress runner's output (default runs/kv_quality)")
    a = ap.parse_args(argv)
    a.prompt_tokens = a.prompt_tokens or (192 if a.tiny else 512)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 32)
    a.random_prompts = a.random_prompts if a.random_prompts is not None else (1 if a.tiny else 3)
    for field, allowed in (("families", FAMILIES), ("inits", tuple(INITS))):
        vals = [x for x in getattr(a, field).split(",") if x]
        bad = sorted(set(vals) - set(allowed))
        if bad or not vals:
            ap.error(f"--{field}: {','.join(bad) or '(empty)'} is not one of {', '.join(allowed)}")
        setattr(a, field, vals)
    if not 0 < a.budget < 1:
        ap.error(f"--budget: {a.budget} is not a fraction in (0, 1)")
    if a.threads < 1:
        ap.error(f"--threads: {a.threads} is not a positive count")
    if a.new_tokens < 2 or a.random_prompts < 0:
        ap.error(f"--new-tokens must be >= 2 (got {a.new_tokens}) and --random-prompts >= 0 "
                 f"(got {a.random_prompts})")
    if a.prompt_tokens < 4 * (NEEDLE_TOKENS + QUESTION_TOKENS):
        ap.error(f"--prompt-tokens: {a.prompt_tokens} is below {4 * (NEEDLE_TOKENS + QUESTION_TOKENS)}, "
                 f"too short for the needle prompt")
    context = a.prompt_tokens + a.new_tokens
    keep = budget_tokens(context, a.budget) - QUESTION_TOKENS - (a.new_tokens - 1)
    if keep <= BLOCK_TOKENS:
        ap.error(f"--budget: {a.budget} of {context} tokens leaves {keep} context tokens for "
                 f"kvpress after the question and the new tokens; raise --budget or --prompt-tokens")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from hf_caches import route_quanto_unpack_to_torch
    from kv_quality_shared import build_model, config_kwargs, make_prompts
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    context = a.prompt_tokens + a.new_tokens
    budget = budget_tokens(context, a.budget)
    prompts = make_prompts(1024, a.prompt_tokens, QUESTION_TOKENS, a.random_prompts,
                           NEEDLE_TOKENS, SEED + 1)
    specs = cache_specs(context, budget)
    quanto_unpack = None
    if quant_missing("quanto") is None:
        quanto_unpack = route_quanto_unpack_to_torch()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "kv_quality", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": [sys.executable] + sys.argv, "machine": machine(),
           "config": {"families": a.families, "inits": {k: INITS[k] for k in a.inits},
                      "prompt_tokens": a.prompt_tokens, "question_tokens": QUESTION_TOKENS,
                      "new_tokens": a.new_tokens, "context_tokens": context,
                      "budget_fraction": a.budget, "budget_tokens": budget,
                      "block_tokens": BLOCK_TOKENS, "needle_tokens": NEEDLE_TOKENS,
                      "seed": SEED, "dtype": "float32", "attn_implementation": "eager",
                      "quanto_unpack": quanto_unpack,
                      "prompts": {k: {"context_tokens": p["context_tokens"], "needle": p["needle"]}
                                  for k, p in prompts.items()}},
           "method": {"same_memory": "eviction methods: the same number of kept tokens at the end "
                                     "(TieredCache's L1 budget B; each press keeps B - question - "
                                     "(new tokens - 1) of the context, so that it holds B at its "
                                     "last forward pass); QuantizedCache: the same bits",
                      "kv_held": "storage bytes of the cache's tensors after every token (peak, "
                                 "end); TieredCache: device_kv_bytes() (L1 blocks), and "
                                 "prefill_peak_bytes where its one-pass prompt held the "
                                 "prompt's KV beyond them (pass_peak_bytes)",
                      "agreement": "greedy tokens and logits against DynamicCache on the same "
                                   "model, prompt and venv; logits over the steps whose inputs "
                                   "are identical (through the first divergent token)"},
           "models": {}, "results": {}}
    spec = {"models": {}, "prompts": prompts, "budget_tokens": budget, "new_tokens": a.new_tokens,
            "block_tokens": BLOCK_TOKENS, "threads": a.threads}
    jobs = [(f, i) for f in a.families for i in a.inits]
    bar = tqdm(total=len(jobs) * len(prompts) * len(specs), desc="kv_quality", unit="run",
               file=sys.stderr)
    for family, init in jobs:
        mkey = f"{family}-{init}"
        kw = config_kwargs(family, INITS[init], max_positions=2 * context)
        model = build_model(family, kw, seed=SEED)
        weights = a.work_dir / f"{mkey}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        spec["models"][mkey] = {"family": family, "config": kw, "weights": str(weights)}
        res["models"][mkey] = {"family": family, "initializer_range": INITS[init],
                               "parameters": sum(p.numel() for p in model.parameters())}
        per_prompt = res["results"][mkey] = {}
        for pkey, p in prompts.items():
            ids = torch.tensor([p["ids"]])
            caches, ref = {}, None
            for name, s in specs.items():
                bar.set_postfix_str(f"{mkey} {pkey} {name}")
                why = quant_missing(name.split("_")[0]) if name.startswith(("quanto", "hqq")) else None
                if why is not None:
                    caches[name] = {"settings": s[0], "status": f"not run: {why}"}
                    bar.update()
                    continue
                try:
                    entry, got = run_cache(name, s, model, ids, a.new_tokens, p, ref)
                except Exception as e:  # noqa: BLE001 (recorded, the other caches still run)
                    if name == "dynamic":
                        raise
                    entry = {"settings": s[0],
                             "status": f"not run: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                if name == "dynamic":
                    ref = got
                    if p["needle"]:
                        entry.update(needle_attention_share(model, ids, *p["needle"], QUESTION_TOKENS))
                caches[name] = entry
                bar.update()
            caches["_ref"] = ref
            per_prompt[pkey] = caches
    bar.close()
    spec_path = a.work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec) + "\n")
    if a.no_kvpress:
        kv = {"status": "not run: --no-kvpress"}
    else:
        why = None
        if a.setup_kvpress and not a.kvpress_python.exists():
            why = setup_kvpress(a.kvpress_python)
        kv = {"status": f"not run: {why}"} if why else \
            run_kvpress(a.kvpress_python, spec_path, a.work_dir / "kvpress", timeout_s=900)
    merge_kvpress(kv, res["results"])
    res["kvpress"] = {k: kv.get(k) for k in ("status", "versions", "needle_test", "run_s")}
    res["kvpress"]["python"] = str(a.kvpress_python)
    res["kvpress"]["pins"] = list(KVPRESS_PINS)
    res["control"] = control_check(res["results"])
    res["summary"] = summarize(res["results"])
    res["total_s"] = time.perf_counter() - t_start
    out = a.out or (Path(os.environ["OUT"]) / "kv_quality.json" if os.environ.get("OUT")
                    else Path("kv_quality.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_tables(res["summary"])
    print("\n" + markdown_table(res["summary"]))
    print(f"\ncontrol: {res['control']}")
    print(f"kvpress: {res['kvpress']['status']}; needle test: {res['kvpress'].get('needle_test')}")
    print(f"wrote {out} ({res['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
