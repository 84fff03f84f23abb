"""Data-parallel training set-up inside a Ray Train process group: FSDP2 sharding per decoder
layer, gathering a sharded model back for saving, and per-rank memory accounting.

Kept apart from the loop, which calls these only with more than one rank; the torch.distributed
imports stay inside the functions.
"""

from __future__ import annotations

import torch

DATA_PARALLEL = ("ddp", "fsdp")


def _decoder_layers(model) -> list:
    """The repeated blocks FSDP shards one by one (Llama ``model.layers``, GPT-2
    ``transformer.h``); empty for an unknown layout (then the model is one unit)."""
    for path in ("model.layers", "transformer.h"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return list(obj)
    return []


def fully_shard_layers(model) -> None:
    """FSDP2 in place: each decoder layer its own unit, then the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def unsharded_copy(model):
    """A plain CPU copy of an FSDP2-sharded model (gathered on every rank, kept on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if torch.distributed.get_rank() != 0:
        return None
    full = AutoModelForCausalLM.from_config(model.config)
    full.load_state_dict(state)
    return full


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
    return local.numel() * local.element_size()


def memory_per_rank(model, opt, world: int) -> list[dict]:
    """Per rank: bytes of parameters, gradients and optimizer state held there, and the peak
    resident memory of the process (``ru_maxrss``); gathered to every rank."""
    import resource

    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(
        _local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    mine = {
        "param_bytes": params,
        "grad_bytes": grads,
        "optimizer_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if world == 1:
        return [mine]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out
