"""The KV engine: one stack below the scenario drivers and the transformers cache.

- ``slots``    the compacting slot arena (L1: live blocks at the front, a view for attention)
- ``shape``    a model's KV geometry and the budget conversions (tokens, bytes, blocks)
- ``stack``    the one constructor of manager + policy + spaces + mover (``build_stack``)
- ``planner``  the per-sequence steps (reads, admission, observation) the live cache and
               the trace replay share
- ``vmm``      the L1 arena on CUDA virtual memory (pages mapped as the live prefix grows)
- ``torch_backend``  the ``Backend`` that moves torch tensors (the transformers cache)

Imports here stay lazy: the page table imports ``synapse.kv.slots`` and nothing else.
"""
