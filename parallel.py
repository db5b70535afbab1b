"""
Data parallelism for train.py under torchrun: DDP (every rank holds the whole model) or FSDP2 (`fully_shard`: weights,
gradients and optimizer state sharded over the ranks, each Block gathered just for its forward and backward).

    ddp_model = wrap(model, "fsdp", device_type, local_rank, world_size, grad_accum, compute_dtype="bfloat16")
    with set_gradient_sync(ddp_model, "fsdp", sync=False):  # a micro-step that only accumulates (grad_accum > 1)
        ddp_model(x, y)[1].backward()
    model_sd, opt_sd = full_state_dict(model, opt, "fsdp")           # every rank calls; rank 0 gets the tensors
    load_optimizer_state(model, opt, opt_sd, "fsdp")

Checkpoints hold the full, unsharded state in one format whatever the mode: the model's state_dict and an optimizer
state_dict keyed by parameter index, as torch.optim.Optimizer.state_dict() writes it. So a checkpoint written under
DDP resumes under FSDP and the other way round, and at another world size. The model's weights are loaded before
sharding (fully_shard shards the loaded tensors); the optimizer state after, into the shards.
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

PARALLEL_MODES = ("ddp", "fsdp")


def wrap(model, parallel, device_type, local_rank, world_size, grad_accum, compute_dtype):
    """DDP wrapper, or the model itself sharded in place by fully_shard (per Block, then the root: the embedding,
    final norm and head). Call after compile_layers, before building the optimizer for fsdp."""
    if parallel == "ddp":
        # Gradients live in DDP's all-reduce buckets (no copy). static_graph lets DDP skip its per-step graph
        # bookkeeping, but only without no_sync: with gradient accumulation it stops all-reducing (pytorch#187732).
        return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True,
                   static_graph=grad_accum == 1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    # bf16 compute, as DDP's autocast computes: each Block's weights are gathered in bf16 (the matmuls' inputs that
    # autocast would make) and its gradients reduced in fp32 (a sum over many ranks in bf16 loses bits). The Blocks'
    # inputs are not cast (cast_forward_inputs=False), and the root (embedding, final norm, head) is gathered in its
    # stored dtype: so the residual stream and the RoPE tables stay fp32 between Blocks, as under DDP.
    block_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
                    if compute_dtype == "bfloat16" else MixedPrecisionPolicy())
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    return model


def set_gradient_sync(wrapped, parallel, sync):
    """A context for one micro-step: DDP's no_sync() when not syncing. FSDP2 reduce-scatters every micro-step
    whatever sync says: its no_sync equivalent (set_requires_gradient_sync(False)) keeps each rank's whole unsharded
    gradients until the last micro-step, world_size times the sharded ones, which undoes what FSDP saves."""
    from contextlib import nullcontext
    return nullcontext() if sync or parallel == "fsdp" else wrapped.no_sync()


def local(t):
    """A DTensor's local shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t):
    """A DTensor gathered whole on every rank (a collective); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model, opt, parallel):
    """(model state_dict, optimizer state_dict), unsharded and in the plain index-keyed format. Under FSDP every rank
    must call it (it gathers); rank 0 receives the tensors, on the CPU, and the other ranks empty dicts."""
    if parallel != "fsdp" or not dist.is_initialized():
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, opt, options=options)  # keyed by parameter name
    if not by_name:
        return model_sd, by_name
    index = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return model_sd, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, opt, state_dict, parallel):
    """Load a full index-keyed optimizer state_dict (from full_state_dict, in either mode) into opt; under FSDP each
    rank keeps its shards of it."""
    if parallel != "fsdp" or not dist.is_initialized():
        opt.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    name_of = {}  # checkpoint index -> parameter name, pairing groups in order as Optimizer.load_state_dict does
    for saved, group in zip(state_dict["param_groups"], opt.param_groups):
        name_of.update({i: names[id(p)] for i, p in zip(saved["params"], group["params"])})
    by_name = {"state": {name_of[i]: s for i, s in state_dict["state"].items()},
               "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
