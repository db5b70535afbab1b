"""Muon's step on several gloo ranks, for tests/test_optim.py, on the CPU:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/muon_ranks.py OUT.pt

Every rank builds the same matrices and gradients (muon_case), steps them under DDP's layout (whole matrices on every
rank) and under FSDP2 (fully_shard: each rank a dim-0 shard), in fp32 and bf16 weights, with stacks of the default
size and with stacks of a few elements (several per shape, the last padded). Rank 0 saves the whole weights of each
run, and for DDP whether every rank's replica holds the same bits.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: optim.py's folder
import optim  # noqa: E402

# Shapes that put the sharing to work on 2 ranks: 5 of a shape (3 places a rank, one padded), rows that 2 ranks
# split unevenly, one row (a rank with an empty shard), a tall matrix.
SHAPES = [(6, 4), (6, 4), (3, 8), (6, 4), (3, 8), (1, 4), (8, 2), (6, 4), (6, 4)]
STEPS = 5


class Matrices(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.ParameterList([nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in SHAPES])


def gradients(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def muon_case(dtype, shard=None):
    """The weights after STEPS Muon steps from the same start and gradients: whole matrices (one process, or replicas
    when a process group is up), or laid over ranks by shard(model), which returns how to set a whole gradient."""
    model = Matrices(dtype)
    set_grad = shard(model) if shard else (lambda p, g: setattr(p, "grad", g))
    opt = optim.Muon([{"params": list(model.w), "muon": True}], lr=0.02, weight_decay=0.01, momentum_warmup_steps=3,
                     seed=5)
    for step in range(STEPS):
        for p, g in zip(model.w, gradients(step, dtype)):
            set_grad(p, g)
        opt.step()
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.w]


def fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model, mesh=mesh)
    return lambda p, g: setattr(p, "grad", distribute_tensor(g, mesh, [Shard(0)]))


def main(out):
    dist.init_process_group("gloo")
    results = {}
    for stack_elements in (optim.STACK_ELEMENTS, 16):
        optim.STACK_ELEMENTS = stack_elements
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{str(dtype)[6:]}, stacks of {stack_elements}"
            ddp = muon_case(dtype)  # replicas: the process group makes the ranks share the orthogonalization
            flat = torch.cat([w.float().flatten() for w in ddp])
            replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(replicas, flat)
            results[f"ddp, {name}"] = ddp
            results[f"replicas equal, {name}"] = all(torch.equal(r, flat) for r in replicas)
            results[f"fsdp, {name}"] = muon_case(dtype, shard=fsdp)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
