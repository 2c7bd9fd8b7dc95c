"""``synapse trace capture``: record an attention trace from a local transformers model.

    synapse trace capture --model-config path/to/model_dir --prompt-tokens 2048 \\
        --decode-steps 128 --block-tokens 16 -o trace.npz
    synapse run my_trace_scenario.yaml       # kind: trace, workload: {trace: trace.npz}

``--model-config`` is a model folder (config.json, and weights unless ``--random-init``)
or a config JSON file (then ``--random-init`` is implied). The prompt is ``--prompt-tokens``
random token ids (seeded): a trace records where attention goes, and the tests use random
models; pass ``--prompt-file`` (token ids, whitespace-separated) for a real prompt.
``register`` adds the group to the ``synapse`` command.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cli import one_line_errors
        return one_line_errors(fn)(*args, **kwargs)
    return wrapper


@click.group("trace")
def trace_group():
    """Attention traces from transformers models, for replay on the simulator."""


@trace_group.command("capture")
@click.option("--model-config", "model_config", required=True, type=click.Path(exists=True),
              help="A model folder (config.json [+ weights]) or a config JSON file.")
@click.option("--random-init", is_flag=True, help="Random weights from the config (no weights needed).")
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--prompt-file", type=click.Path(exists=True), default=None,
              help="Token ids of the prompt, whitespace-separated (instead of random ids).")
@click.option("--decode-steps", type=int, default=64, show_default=True)
@click.option("--block-tokens", type=int, default=16, show_default=True)
@click.option("--prefill-chunk", type=int, default=None, help="Prompt tokens per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Trace file (.npz), checked before the model runs and written atomically.")
@_one_line_errors
def capture_cmd(model_config, random_init, prompt_tokens, prompt_file, decode_steps,
                block_tokens, prefill_chunk, seed, device, out):
    """Run a prompt and greedy decode steps; record attention mass per KV block per step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .errors import ScenarioError
    from .outputs import check_file
    from .trace_capture import capture
    check_file(out, "-o")  # before the model runs
    path = Path(model_config)
    if path.is_file():
        cfg = _config_from_json(path)
        random_init = True
    else:
        cfg = AutoConfig.from_pretrained(str(path))
    torch.manual_seed(seed)
    if random_init:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    model = model.to(device).eval()
    if prompt_file:
        ids = [int(x) for x in Path(prompt_file).read_text().split()]
        if not ids:
            raise ScenarioError(f"{prompt_file}: no token ids")
        input_ids = torch.tensor([ids], device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=g).to(device)
    tr = capture(model, input_ids, decode_steps=decode_steps, block_tokens=block_tokens,
                 prefill_chunk=prefill_chunk)
    p = tr.save(out)
    m = tr.model
    click.echo(f"wrote {p}: {tr.steps} steps, {tr.num_blocks} blocks of {block_tokens} tokens, "
               f"{m['model_type']} layers={m['layers']} kv_heads={m['kv_heads']} "
               f"head_dim={m['head_dim']}")


def _config_from_json(path: Path):
    import json

    from transformers import AutoConfig
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        from .errors import ScenarioError
        raise ScenarioError(f"{path}: no model_type in the config JSON")
    return AutoConfig.for_model(model_type, **data)


def register(main) -> None:
    main.add_command(trace_group)
