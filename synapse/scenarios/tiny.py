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
TINY_PREFIX = ["model.layers=2", "model.kv_heads=2", "model.head_dim=64",
               "workload.chunk_tokens=32", "workload.system_tokens=64", "workload.turn_tokens=48",
               "workload.documents=4", "workload.document_tokens=256",
               "workload.question_tokens=16", "workload.max_context_tokens=512",
               "memory.l1_budget=640KiB", "memory.l2_budget=1MiB", "workload.l3_budget=2MiB",
               "workload.requests=40", "workload.tenants=2"]
