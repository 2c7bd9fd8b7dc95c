"""Override sets that shrink the shipped scenarios to a fraction of a second, even on the
NumPy ``cpu`` backend: shared by the tests and ``benchmarks/check_sim_parity.py`` so a
change to the tiny shapes reaches both."""

TINY_NEEDLE = ["workload.context_tokens=2048", "workload.decode_steps=16",
               "workload.prefill_chunk_tokens=256", "model.layers=2", "model.kv_heads=2",
               "model.head_dim=64", "workload.check_every=4"]
TINY_STREAM = ["workload.layers=6", "workload.hidden=256", "workload.passes=2",
               "workload.batch_tokens=4", "workload.vram_budget=40%"]
TINY_TSUNAMI = ["model.layers=2", "model.kv_heads=2", "model.head_dim=64",
                "memory.l1_budget=256KiB", "memory.l2_budget=512KiB", "workload.requests=12",
                "workload.prompt_tokens=64", "workload.decode_tokens=24", "workload.max_running=4"]
TINY_TENANTS = ["model.layers=2", "model.kv_heads=2", "model.head_dim=64",
                "memory.l1_budget=512KiB", "memory.l2_budget=2MiB", "workload.probe_every=2",
                "workload.tenants=[{name: a, share: 0.5, requests: 3, prompt_tokens: 64, "
                "decode_tokens: 32},{name: b, share: 0.5, requests: 6, prompt_tokens: 96, "
                "decode_tokens: 48}]"]
