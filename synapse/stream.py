"""``synapse.stream``: run any ``torch.nn.Module`` with weights larger than the VRAM budget.

    with synapse.stream(model, vram_budget="4GiB", prefetch_depth=2) as handle:
        out = model(x)
    handle.stats   # effective GB/s and stall time per forward

The layers' weights move to (pinned) host memory and stream through a skip-end ring on
the device, layer i+k copied on a separate stream while layer i computes; see
``synapse.hw.torch_stream`` for the mechanism. Importing this module does not import
torch; calling ``stream`` does.
"""

from __future__ import annotations


def stream(model, vram_budget, prefetch_depth: int = 2, device=None, pin_embeddings: bool = True,
           layers=None):
    """Stream ``model``'s layers through a ring of ``vram_budget`` (bytes, a size string
    such as ``"4GiB"``, or a fraction of the model such as ``0.25``) on ``device`` (default:
    CUDA if available, else CPU, where the "device" ring is a CPU buffer).

    Layers: the children of an ``nn.Sequential``, or the largest ``nn.ModuleList`` (a
    transformers model's decoder layers), or ``layers`` given explicitly. Other parameters
    (embeddings, norms, head) stay resident on the device and count against the budget;
    ``pin_embeddings=False`` streams the input embedding and output head too. Returns a
    ``StreamHandle``: a context manager whose exit (or ``.restore()``) puts every parameter
    back; ``.stats`` reports bytes streamed, effective bandwidth and stall time per forward.
    Raises CapacityError (naming the numbers) if the budget cannot hold the resident
    parameters plus the largest layer, and NoStreamableLayers if there is nothing to stream,
    both before any forward runs.
    """
    from .hw.torch_stream import StreamHandle
    return StreamHandle(model, vram_budget, prefetch_depth=prefetch_depth, device=device,
                        pin_embeddings=pin_embeddings, layers=layers)
