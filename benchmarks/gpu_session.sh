#!/usr/bin/env bash
# One device call, end to end: install PyCUDA, GPU tests, calibrate, scenarios on cuda and
# on the simulator with the calibrated profile, peer comparisons. Logs and JSON go to $OUT.
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh
#   a subset:                    STAGES="env tests" bash benchmarks/gpu_session.sh
#   some test files only:        CUDA_TESTS="tests/test_hf_cache.py tests/test_hf_prefix.py" STAGES="env tests" ...
source benchmarks/gpu_env.sh
# The device tool brings back only a few files: everything is written under $RES and
# packed into one archive at the end (plus summary.txt beside it).
FINAL_OUT=$OUT
RES=${RES:-/tmp/gpu_session}
rm -rf "$RES" && mkdir -p "$RES"
OUT=$RES
trap 'kill $WATCHDOG 2>/dev/null; tar czf "$FINAL_OUT/session.tar.gz" -C "$RES" . && cp -f "$RES/summary.txt" "$FINAL_OUT/" 2>/dev/null; true' EXIT
# The device tool kills a command at its limit without a chance to pack the results; stop
# the running stage a little earlier instead, so the archive still comes back.
trap 'echo "=== session limit (${SESSION_LIMIT_S:-560} s) reached: packing what is there"; exit 143' TERM
( sleep "${SESSION_LIMIT_S:-560}"; kill -TERM $$; pkill -TERM -P $$ ) </dev/null >/dev/null 2>&1 &
WATCHDOG=$!
STAGES=${STAGES:-"env tests ncu stream hf slab calibrate scenarios summary"}
# int4k (issue 11 item 4: every INT4 kernel variant timed against the device copy, with
# their cuda tests: STAGES="env int4k"; then set QUANT_VARIANT / DEQUANT_VARIANT as printed);
# kv (issue 11: VMM page costs, TieredCache vs transformers' caches on a Qwen2 shape, 32k);
# batch (issue 16: the same caches at batch 8 and batch 1, 8k prompts: STAGES="env batch");
# ring (the MLP stack of 2026-11-24 against cpu_offload) is available but not in the default;
# kvflash (the kv stage's caches with --sdpa-priority flash: STAGES="env kvflash");
# gap (decode_step_gap.py: the full-budget decode step against DynamicCache's, by variant);
# kvar (the kv stage's caches with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1: STAGES="env kvar");
# sdpacalls (the decode attention calls as the model makes them, host time by layer, both ways);
# profile (torch.profiler of TieredCache's decode/prefill at 32k and of one L2 time to
# first token, cProfile of the tenants scenario on cuda: STAGES="env profile");
# so are operate (synapse audit --backend cuda, monitor overhead on the GPU: STAGES="env operate")
# and prefix (issue 13: prefix_reuse on cuda and sim, then the TTFT benchmark; L3_DIR should
# be on the machine's local NVMe, the benchmark prints which file system it measured)
PROFILE=${PROFILE:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H200 && echo h200 || echo h100)}
mkdir -p "$OUT/logs"
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo; echo "=== $1 ($(date +%T))"; }

if has env; then
  stage "versions"
  python3 - <<'PY' | tee "$OUT/environment.json"
import json, platform, subprocess
env = {"python": platform.python_version()}
for mod in ("numpy", "torch", "pycuda", "transformers", "accelerate", "optimum.quanto", "simpy", "plotly"):
    try:
        m = __import__(mod, fromlist=['_']); env[mod] = getattr(m, "__version__", getattr(m, "VERSION_TEXT", "?"))
    except Exception as e:
        env[mod] = f"missing ({type(e).__name__})"
try:
    from cuda.bindings import __version__ as cb; env["cuda-bindings"] = cb
except Exception:
    pass
q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max,memory.total",
                    "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
env["nvidia-smi"] = q
env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
print(json.dumps(env, indent=1))
PY
  (nvidia-smi topo -m; command -v numactl >/dev/null && numactl -H; lscpu | head -20) > "$OUT/logs/topology.txt" 2>&1
  head -30 "$OUT/logs/topology.txt"
fi

if has tests; then
  stage "pytest -m cuda"
  timeout ${TESTS_LIMIT_S:-240} python3 -m pytest -m cuda -q -rs ${PYTEST_ARGS:-} ${CUDA_TESTS:-tests/} 2>&1 | tee "$OUT/logs/pytest_cuda.log" | tail -25
fi

if has calibrate; then
  stage "calibrate (ceilings, short runs of every driver: host costs and the op table; profile)"
  # the host fit's residual per run and each op kind's table error are in calibrate.log;
  # CALIBRATE_ARGS="--quick" takes about a quarter of the time (one short run per driver)
  python3 -m synapse calibrate --backend cuda ${CALIBRATE_ARGS:-} -o "profiles/$PROFILE.yaml" 2>&1 | tee "$OUT/logs/calibrate.log"
  mkdir -p "$OUT/profiles" && cp profiles/$PROFILE.yaml profiles/$PROFILE.measurements.json \
    profiles/$PROFILE.optable.json "$OUT/profiles/"
fi

if has scenarios; then
  stage "scenarios on cuda and on the simulator (profile $PROFILE)"
  timeout ${PAIRS_LIMIT_S:-360} python3 benchmarks/scenario_pairs.py --profile "$PROFILE" --out "$OUT" 2>&1 | tee "$OUT/logs/scenario_pairs.log"
  if python3 -m synapse compare --help >/dev/null 2>&1; then
    for s in needle streaming tsunami tenants; do
      python3 -m synapse compare "$OUT/$s-sim" "$OUT/$s-cuda" \
        --out "$OUT/compare-$s" 2>&1 | tee "$OUT/logs/compare-$s.log" | tail -30
    done
  fi
  # held-out: configurations the calibration never ran (other L1 budgets and context lengths)
  timeout ${HELDOUT_LIMIT_S:-200} python3 benchmarks/scenario_pairs.py --profile "$PROFILE" \
    --scenarios needle_heldout,tsunami_heldout --out "$OUT" 2>&1 | tee "$OUT/logs/scenario_pairs_heldout.log"
  for s in needle_heldout tsunami_heldout; do
    python3 -m synapse compare "$OUT/$s-sim" "$OUT/$s-cuda" \
      --out "$OUT/compare-$s" 2>&1 | tee "$OUT/logs/compare-$s.log" | tail -30
  done
  # each host model fitted on the calibration pieces only, against these full runs (CPU)
  if [ -f "profiles/$PROFILE.measurements.json" ] && [ "${SIM_HOST_MODEL:-1}" = 1 ]; then  # 0: run it on the CPU later
    python3 benchmarks/sim_host_model.py --measurements "profiles/$PROFILE.measurements.json" \
      --runs "$OUT" --out "$OUT/sim_host_model.json" 2>&1 | tee "$OUT/logs/sim_host_model.log" | tail -24
  fi
fi

if has prefix; then
  stage "prefix reuse: scenario on cuda and sim, then time to first token from L2/L3"
  PREFIX_SET="--set model.layers=8 --set memory.l1_budget=768MiB --set memory.l2_budget=1536MiB --set workload.l3_budget=16GiB"
  if [ "${PREFIX_SCENARIO:-1}" = 1 ]; then  # PREFIX_SCENARIO=0: the time-to-first-token benchmark only
    for b in sim cuda; do
      python3 -m synapse run prefix_reuse --backend $b $PREFIX_SET --out "$OUT/prefix_reuse-$b" -q 2>&1 | tee "$OUT/logs/prefix_reuse-$b.log"
    done
    python3 -m synapse compare "$OUT/prefix_reuse-sim" "$OUT/prefix_reuse-cuda" --out "$OUT/compare-prefix_reuse" 2>&1 | tee "$OUT/logs/compare-prefix_reuse.log" | tail -30
  fi
  python3 benchmarks/prefix_attention_kernels.py --out "$OUT/prefix_attention_kernels.json" 2>&1 | tee "$OUT/logs/prefix_attention_kernels.log"
  timeout ${PREFIX_LIMIT_S:-300} python3 benchmarks/prefix_reuse.py --device cuda --model llama-8b-shape \
    --l3-dir "${L3_DIR:-/tmp/synapse-l3}" --out "$OUT/prefix_reuse.json" 2>&1 | tee "$OUT/logs/prefix_reuse.log" | tail -12
fi

if has ncu; then
  stage "INT4 kernels: events, then Nsight Compute counters"
  python3 benchmarks/int4_ncu.py 2>&1 | tee "$OUT/logs/int4_events.log"
  if command -v ncu >/dev/null; then
    timeout 180 ncu --clock-control none --kernel-name regex:int4_ --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      python3 benchmarks/int4_ncu.py > "$OUT/logs/ncu_int4.txt" 2>&1
    grep -E "int4_|Throughput|Busy|Issue Slots|Pipe|Duration" "$OUT/logs/ncu_int4.txt" | head -40
  else
    echo "ncu not on PATH" | tee "$OUT/logs/ncu_int4.txt"
  fi
fi

if has int4k; then
  stage "INT4 kernel variants against the device copy (issue 11 item 4), then their bit-exactness tests"
  # INT4K_ARGS: e.g. "--group-sizes 64 --sizes 1048576,8388608,67108864,268435456 --variants
  # dequantize:bulk,dequantize:staged" (larger inputs, fewer variants); INT4K_TESTS=0: no tests
  timeout ${INT4K_LIMIT_S:-300} python3 benchmarks/int4_kernels.py ${INT4K_ARGS:-} --out "$OUT/int4_kernels.json" 2>&1 | tee "$OUT/logs/int4_kernels.log" | tail -25
  [ "${INT4K_TESTS:-1}" = 1 ] && timeout ${INT4K_TESTS_LIMIT_S:-200} python3 -m pytest -m cuda -q -rs tests/test_kernels_cuda.py -k "bit_exact or variants_agree" 2>&1 | tee "$OUT/logs/pytest_int4k.log" | tail -8
fi

if has stream; then
  stage "weight streaming of a transformers model: synapse.stream versus Accelerate cpu_offload"
  timeout ${STREAM_LIMIT_S:-240} python3 benchmarks/stream_vs_accelerate.py --out "$OUT/stream_vs_accelerate.json" 2>&1 | tee "$OUT/logs/stream.log" | tail -40
fi

if has ring; then
  stage "weight streaming of an MLP stack: skip-end ring versus Accelerate cpu_offload"
  python3 benchmarks/ring_vs_accelerate.py --out "$OUT/ring_vs_accelerate.json" 2>&1 | tee "$OUT/logs/ring.log" | tail -30
fi

if has hf; then
  stage "KV caches in generate(): TieredCache versus transformers' own"
  timeout ${HF_LIMIT_S:-240} python3 benchmarks/hf_caches.py --device cuda --out "$OUT/hf_caches.json" 2>&1 | tee "$OUT/logs/hf_caches.log" | tail -40
fi

if has kv; then
  stage "KV engine: virtual-memory page costs, then TieredCache against transformers' caches (Qwen2-shaped, ${KV_PROMPT:-32768}-token prompt)"
  python3 benchmarks/vmm_pages.py --out "$OUT/vmm_pages.json" 2>&1 | tee "$OUT/logs/vmm_pages.log" | tail -12
  timeout ${KV_LIMIT_S:-330} python3 benchmarks/hf_caches.py --device cuda --model qwen2 \
    --prompt-tokens ${KV_PROMPT:-32768} --new-tokens ${KV_NEW:-64} --repeats ${KV_REPEATS:-2} \
    --time-budget ${KV_BUDGET_S:-280} --caches ${KV_CACHES:-dynamic,offloaded,tiered_full,tiered_h2o,tiered_lru} \
    --out "$OUT/hf_caches_qwen2.json" 2>&1 | tee "$OUT/logs/hf_caches_qwen2.log" | tail -25
fi

if has gap; then
  stage "where a full-budget TieredCache's decode step spends the time DynamicCache's does not (variants, per-step host wall)"
  timeout ${GAP_LIMIT_S:-240} python3 benchmarks/decode_step_gap.py --device cuda --prompt-tokens ${KV_PROMPT:-32768} \
    --repeats ${GAP_REPEATS:-3} ${GAP_VARIANTS:+--variants $GAP_VARIANTS} --out "$OUT/decode_step_gap.json" 2>&1 | grep -v Warning | tee "$OUT/logs/decode_step_gap.log" | tail -10
fi

if has kvar; then
  stage "the kv stage's caches with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 for every cache (cuDNN plans keyed on the key length rounded to a power of two where q, k, v are BSHD)"
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 timeout ${KVAR_LIMIT_S:-330} python3 benchmarks/hf_caches.py --device cuda --model qwen2 \
    --prompt-tokens ${KV_PROMPT:-32768} --new-tokens ${KV_NEW:-64} --repeats ${KV_REPEATS:-2} \
    --time-budget ${KV_BUDGET_S:-280} --caches ${KV_CACHES:-dynamic,offloaded,tiered_full,tiered_h2o,tiered_lru} \
    --out "$OUT/hf_caches_qwen2_ar.json" 2>&1 | tee "$OUT/logs/hf_caches_qwen2_ar.log" | tail -25
fi

if has sdpacalls; then
  stage "the decode step's attention calls as the model makes them, per cache (${SDPACALLS_VARIANTS:-default ar})"
  for variant in ${SDPACALLS_VARIANTS:-default ar}; do
    case $variant in
      default) extra="";; ar) extra="--avoid-recompile";; generate) extra="--via generate";;
      flash) extra="--backend flash";; *) echo "unknown SDPACALLS_VARIANTS entry $variant"; continue;;
    esac
    timeout ${SDPACALLS_LIMIT_S:-150} python3 benchmarks/decode_sdpa_calls.py --prompt-tokens ${KV_PROMPT:-32768} $extra \
      --out "$OUT/decode_sdpa_calls_${variant}.json" 2>&1 | grep -v Warning | tee "$OUT/logs/decode_sdpa_calls_${variant}.log" | tail -6
  done
fi

if has kvflash; then
  stage "the same caches with flash attention tried first for every cache (what SDPA's kernel choice costs a decode step)"
  timeout ${KVFLASH_LIMIT_S:-200} python3 benchmarks/hf_caches.py --device cuda --model qwen2 \
    --prompt-tokens ${KV_PROMPT:-32768} --new-tokens ${KV_NEW:-64} --time-budget 180 \
    --caches ${KVFLASH_CACHES:-dynamic,tiered_h2o} --sdpa-priority flash --repeats ${KVFLASH_REPEATS:-1} \
    --out "$OUT/hf_caches_qwen2_flash.json" 2>&1 | tee "$OUT/logs/hf_caches_qwen2_flash.log" | tail -14
fi

if has batch; then
  stage "TieredCache at batch ${BATCH:-8} against batch 1, ${BATCH_PROMPT:-8192}-token prompts (issue 16's per-sequence ratio)"
  timeout ${BATCH_LIMIT_S:-300} python3 benchmarks/hf_caches.py --device cuda --model qwen2 --batch ${BATCH:-8} \
    --prompt-tokens ${BATCH_PROMPT:-8192} --new-tokens ${BATCH_NEW:-32} --repeats ${BATCH_REPEATS:-2} \
    --time-budget ${BATCH_BUDGET_S:-260} --caches ${BATCH_CACHES:-dynamic,tiered_full,tiered_h2o} \
    --out "$OUT/hf_caches_batch.json" 2>&1 | tee "$OUT/logs/hf_caches_batch.log" | tail -25
fi

if has profile; then
  stage "where the time goes: TieredCache at 32k (torch.profiler), one L2 time to first token, the tenants scenario's host (cProfile)"
  [ "${PROFILE_KERNELS:-1}" = 1 ] && python3 benchmarks/decode_attention_kernels.py --out "$OUT/decode_attention_kernels.json" 2>&1 | tee "$OUT/logs/decode_attention_kernels.log"
  for spec in ${PROFILE_HF:-tiered_h2o:decode tiered_h2o:prefill tiered_full:prefill}; do
    c=${spec%%:*}; ph=${spec##*:}
    timeout ${PROFILE_HF_LIMIT_S:-120} python3 benchmarks/profile_hf_step.py --device cuda --model qwen2 --cache $c \
      --prompt-tokens ${KV_PROMPT:-32768} --phase $ph --rows 30 ${PROFILE_ARGS:-} --json "$OUT/profile_${c}_${ph}.json" \
      > "$OUT/logs/profile_${c}_${ph}.log" 2>&1; tail -45 "$OUT/logs/profile_${c}_${ph}.log"
  done
  if [ "${PROFILE_TTFT:-1}" = 1 ]; then
    timeout ${PREFIX_LIMIT_S:-300} python3 benchmarks/prefix_reuse.py --device cuda --model llama-8b-shape --caches dynamic \
      --repeats 2 --l3-dir "${L3_DIR:-/tmp/synapse-l3}" --profile "$OUT/ttft-trace" --out "$OUT/prefix_reuse_profiled.json" \
      2>&1 | tee "$OUT/logs/prefix_reuse_profiled.log" | tail -50
  fi
  # the scenario's host, data checks off as scenario_pairs.py times them: cProfile, then unprofiled
  for s in ${PROFILE_SCENARIOS:-tenants needle tsunami}; do
    timeout ${PROFILE_HOST_LIMIT_S:-150} python3 -m cProfile -o "$OUT/${s}_cuda.pstats" -m synapse run $s \
      --backend cuda --set checks.data=false --out "$OUT/${s}-profiled" -q > "$OUT/logs/${s}_profiled.log" 2>&1
    python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(30)" \
      "$OUT/${s}_cuda.pstats" > "$OUT/logs/${s}_cprofile.txt" 2>&1
    timeout 120 python3 -m synapse run $s --backend cuda --set checks.data=false --out "$OUT/${s}-plain" -q > "$OUT/logs/${s}_plain.log" 2>&1
    python3 -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print(sys.argv[2], {k: m.get(k) for k in ('run_time_s', 'host_busy_s', 'decision_s', 'host_rest_s', 'host_rest_fraction')})" \
      "$OUT/${s}-plain/result.json" $s
  done
fi

if has slab; then
  stage "slab allocator versus torch.empty"
  python3 benchmarks/slab_vs_torch.py --out "$OUT/slab_vs_torch.json" 2>&1 | tee "$OUT/logs/slab.log" | tail -20
fi

if has operate; then
  stage "readiness audit on cuda, and what the monitor costs on the GPU"
  timeout ${AUDIT_LIMIT_S:-300} python3 -m synapse audit --backend cuda --preset tiny --out "$OUT/audit-cuda" 2>&1 | tee "$OUT/logs/audit_cuda.log" | tail -45
  timeout ${OVERHEAD_LIMIT_S:-200} python3 benchmarks/monitor_overhead.py --device cuda --out "$OUT/monitor_overhead.json" 2>&1 | tee "$OUT/logs/monitor_overhead.log" | tail -12
fi

if has summary; then
  stage "summary"
  python3 benchmarks/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
fi
