"""
The optimizers of train.py and the parameter groups each one gets (make_optimizer): Muon with AdamW beside it, and
memory-lean AdamW and Adafactor for bf16 weights. Used by train.py and the tools.

    from optim import AdamW, Adafactor, Muon
    opt = Muon(groups, lr=3e-4, betas=(0.8, 0.95), seed=1337)   # groups with muon=True: Muon; the others: AdamW
    opt = AdamW(groups, lr=3e-4, betas=(0.9, 0.95), seed=1337)  # as torch.optim.AdamW computes it
    opt = Adafactor(groups, lr=3e-4, seed=1337)                  # lr in AdamW's units (an absolute step)
    opt = Muon(groups, ..., compile=True)                        # Muon and AdamW: each stage one compiled call

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon) orthogonalizes each weight matrix's Nesterov momentum
with a quintic Newton-Schulz iteration, as torch.optim.Muon does. The step is batched: the matrices of one shape are
stacked, and each stage (momentum, orthogonalization, update) is one call on the stack, compiled with compile=True,
which reads the schedule's values (LR, momentum, step) from device tensors: a moving LR never recompiles. So a step
dispatches a number of operators set by the model's matrix shapes, not by its depth (one matrix at a time, it
dispatched some 330 a layer, and on a GPU the kernels waited for the host to launch them). Across ranks, each rank
orthogonalizes its share of every stack: under DDP the results are all-gathered, so every replica applies the same
bits; under FSDP2 one all_to_all a stack brings each rank the rows of the whole matrices it owns and another sends
the results' rows back, so no rank holds every whole matrix.

The AdamW beside Muon steps fp32 weights with torch's fused AdamW kernel. With bf16 weights (Muon, AdamW and Adafactor
here) the state is bf16 too: AdamW's 8 bytes a parameter instead of 16, Muon's momentum 2. Each step computes in fp32
and writes bf16 back with stochastic rounding, which is unbiased: updates far below a bf16 weight's resolution (2^-8
relative) still move it on average (Zamirai et al., arXiv 2010.06192). Its random bits are a hash of (seed, step,
parameter, element), computed on the device with the element numbered in the whole tensor: every rank rounds alike
however the weights are sharded or stacked, and a resumed run rounds as an uninterrupted one.

No step reads a device value on the host (torch.optim.Adafactor calls .item() once per parameter per step, a GPU sync
each): the step counters the host reads are CPU tensors. Parameters may be FSDP2 DTensors: the step works on each
rank's local shard.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import local as _local  # a DTensor's local shard, a view: in-place ops on it change the DTensor
from machine import default_dtype

# Parameters stacked into one call of a step's kernels: at most this many elements (256 MB in fp32), so the step's
# stacked copies stay small next to the model's state. Stacks reach it only in models past about 1B parameters.
STACK_ELEMENTS = 1 << 26

# -----------------------------------------------------------------------------
# stochastic rounding, with random bits hashed on the device

MASK32 = 0xFFFFFFFF
WEIGHT, EXP_AVG, EXP_AVG_SQ, MOMENTUM = range(4)  # which of a parameter's tensors is rounded: one stream each


def mix32(x):
    """Wellons' lowbias32 integer hash (github.com/skeeto/hash-prospector) of x in [0, 2^32): a Python int, or
    elementwise an int64 tensor. Every product stays below 2^63, so no signed overflow: the second multiplier,
    0x846CA68B, is applied as 0x046CA68B plus 2^31."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B + ((x & 1) << 31)) & MASK32
    return x ^ (x >> 16)


def step_key(seed, step):
    """The random stream of one optimizer step, a 32-bit int."""
    return mix32(mix32(seed & MASK32) ^ (step & MASK32))


def stochastic_round_to_bf16(x, keys, first_element=0):
    """fp32 x -> bf16, rounding away from zero with probability (dropped low 16 bits) / 2^16, so E[result] = x: adding
    16 random bits to the fp32 bit pattern and truncating does exactly that (a carry moves to the next bf16 value,
    across binades too); inf and nan stay as they are. x is a stack (n, ...) of n tensors and keys their n random
    streams (an int64 tensor, or one int for all): an element's bits hash its stream with its index in its tensor,
    counted from first_element (where a shard starts in its whole tensor)."""
    if isinstance(keys, torch.Tensor):
        keys = keys.view(-1, *[1] * (x.dim() - 1))
    index = torch.arange(first_element, first_element + x[0].numel(), device=x.device).view(x.shape[1:])
    noise = (mix32(keys ^ index) & 0xFFFF).to(torch.int32)
    bits = (x.view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000; a finite x's bits cannot overflow int32
    return torch.where(x.isfinite(), bits.view(torch.float32), x).to(torch.bfloat16)  # exact: low 16 bits are zero


def _store(target, value, key, ids, kind, first_element=0):
    """Write the fp32 stack value into the stack target, in target's dtype: bf16 by stochastic rounding (each
    tensor's stream: the step's key, the parameter's id, which of its tensors), any other dtype by a copy (none
    when value is target: an fp32 stack updated in place)."""
    if target.dtype == torch.bfloat16:
        value = stochastic_round_to_bf16(value, mix32(mix32(key ^ ids) ^ kind), first_element)
    target.copy_(value)


# -----------------------------------------------------------------------------
# the kernels of a step: each works on a stack (n, ...) of same-shape tensors, in place, and runs eagerly or compiled


def adamw_update(weights, grads, exp_avgs, exp_avg_sqs, lr, bias1, bias2_sqrt, beta1, beta2, eps, weight_decay, key,
                 ids, first_element):
    """One AdamW step (arXiv 1711.05101) as torch.optim.AdamW computes it (decoupled decay, bias-corrected moments),
    in fp32; weights and moments written back in their dtypes. bias1 = 1 - beta1^t, bias2_sqrt = sqrt(1 - beta2^t)."""
    g, m, v, w = grads.float(), exp_avgs.float(), exp_avg_sqs.float(), weights.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    w.sub_((lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps))
    _store(exp_avgs, m, key, ids, EXP_AVG, first_element)
    _store(exp_avg_sqs, v, key, ids, EXP_AVG_SQ, first_element)
    _store(weights, w, key, ids, WEIGHT, first_element)


def muon_momentum(grads, bufs, mu, nesterov, dtype, key, ids, first_element):
    """Muon's momentum: bufs <- lerp(bufs, grads, 1 - mu), in place; returns what is orthogonalized, in dtype:
    Nesterov's lerp(grads, bufs, mu), or bufs."""
    g, m = grads.float(), bufs.float()  # fp32 stacks as they are (in-place ops below then write them directly)
    m.lerp_(g, 1 - mu)
    _store(bufs, m, key, ids, MOMENTUM, first_element)
    return (g.lerp(m, mu) if nesterov else m).to(dtype)


def muon_update(weights, ortho, lr, weight_decay, scale, key, ids, first_element):
    """weights <- weights (1 - lr weight_decay) - lr scale ortho, in place."""
    w = weights.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.addcmul_(ortho, lr, value=-scale)  # in fp32, w's dtype
    _store(weights, w, key, ids, WEIGHT, first_element)


# The quintic Newton-Schulz iteration's coefficients and step count of Keller Jordan's Muon, chosen to raise small
# singular values fast; torch.optim.Muon uses the same (its DEFAULT_A, _B, _C).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g, steps=NS_STEPS, eps=1e-7, dtype=None):
    """A matrix close to U V^T, where g = U S V^T, for one matrix g or each of a stack (n, rows, cols): the quintic
    Newton-Schulz iteration, in `dtype` (default: bf16 where its matmuls are native, as torch.optim.Muon always
    computes it; fp32 on a CPU without AVX512-BF16 or AMX, where emulated bf16 makes the iteration some 40 x slower
    than fp32). It does not converge to 1: the singular values land in about [0.7, 1.2] (Jordan: "S' ~ Uniform(0.5,
    1.5)"), which trains as well as the exact U V^T. Returns matrices of that dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or getattr(torch, default_dtype(g.device.type)))
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius >= spectral norm: singular values <= 1
    mul_add = torch.addmm if x.dim() == 2 else torch.baddbmm  # beta input + alpha (m1 @ m2), one GEMM
    for _ in range(steps):
        gram = x @ x.mT
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x


# -----------------------------------------------------------------------------
# stacks: the parameters of one shape, stepped together


def _stacked(tensors, slots):
    """The tensors as one (slots, ...) tensor: a view of a single one (the kernels write through it), else a stacked
    copy padded with zeros to slots."""
    if slots == 1:
        return tensors[0].unsqueeze(0)
    stacked = torch.stack(tensors)
    extra = slots - len(tensors)
    return F.pad(stacked, [0, 0] * (stacked.dim() - 1) + [0, extra]) if extra else stacked


def _unstack(tensors, stacked):
    """Copy a stack's first len(tensors) entries back into the tensors (a view of a single one needs nothing)."""
    if stacked.size(0) > 1:
        torch._foreach_copy_(tensors, list(stacked.unbind(0)[:len(tensors)]))


class _Stack:
    """Same-shape parameters that each kernel steps in one call: `params` fill the first of `slots` places (the rest
    are zeros), `per_rank` of them for each of the ranks that share the orthogonalization (Muon). `ids` number each
    place's random stream; `first_element` is where this rank's shard starts in its whole tensor (FSDP)."""

    def __init__(self, params, per_rank, world, index_of):
        self.params, self.per_rank, self.slots = params, per_rank, per_rank * world
        p = params[0]
        self.shape, self.local_shape = tuple(p.shape), tuple(_local(p).shape)
        device = _local(p).device
        self.ids = torch.tensor([mix32(index_of[id(q)]) for q in params] + [0] * (self.slots - len(params)),
                                device=device)
        # FSDP2 shards dim 0 as torch.chunk does: each rank holds ceil(rows / ranks) rows, the last ones fewer or none
        self.shard_rows = -(-self.shape[0] // world) if hasattr(p, "device_mesh") else self.shape[0]
        rank = p.device_mesh.get_local_rank() if hasattr(p, "device_mesh") else 0
        self.first_element = rank * self.shard_rows * math.prod(self.shape[1:])
        if hasattr(p, "device_mesh"):
            _check_sharding(self)


def stack_groups(params, world):
    """params grouped by shape and dtype (in order of first appearance) into stacks of at most STACK_ELEMENTS
    elements where a shape has more, as (params, per_rank): `world` equal shares of per_rank places. A shape's stacks
    all have the same number of places (the last one padded), so each kernel sees one shape per parameter shape."""
    by_shape = {}
    for p in params:
        by_shape.setdefault((tuple(p.shape), p.dtype), []).append(p)
    stacks = []
    for (shape, _), same in by_shape.items():
        n, size = len(same), math.prod(shape)
        per_rank = max(1, min(-(-n // world), STACK_ELEMENTS // (world * size)))
        rounds = -(-n // (world * per_rank))
        per_rank = -(-n // (world * rounds))  # balanced: as few empty places as the number of stacks allows
        stacks += [(same[i:i + per_rank * world], per_rank) for i in range(0, n, per_rank * world)]
    return stacks


def _layout(p):
    """(process group, ranks, this rank) over which the Muon matrix p's orthogonalization is shared: an FSDP2
    DTensor's mesh, every rank of torchrun's group for a replica (DDP), or none."""
    if hasattr(p, "device_mesh"):
        return p.device_mesh.get_group(), p.device_mesh.size(), p.device_mesh.get_local_rank()
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    return None, 1, 0


def _check_sharding(stack):
    """FSDP2 must shard dim 0 as torch.chunk does (the all_to_all puts rows back by that rule), or updates go astray."""
    from torch.distributed.tensor import Shard
    p = stack.params[0]
    if tuple(p.placements) != (Shard(0),):
        raise RuntimeError(f"Muon expects FSDP2's dim-0 sharding, got {p.placements}")
    rank = p.device_mesh.get_local_rank()
    rows = max(0, min(stack.shard_rows, stack.shape[0] - rank * stack.shard_rows))
    if stack.local_shape != (rows, *stack.shape[1:]):
        raise RuntimeError(f"Muon: this rank's rows of a {stack.shape} matrix are {(rows, *stack.shape[1:])} by "
                           f"torch.chunk, but its FSDP shard is {stack.local_shape}")


# -----------------------------------------------------------------------------
# the optimizers


class _StackedOptimizer(torch.optim.Optimizer):
    """Shared part: state set-up, step counters, the schedule's values as device tensors, the stacks, the kernels
    (compiled or not), and the AdamW step on stacks with stochastic rounding."""

    def __init__(self, params, defaults, seed, compile=False):
        super().__init__(params, defaults)
        self.seed, self.compile = seed, compile
        self._kernels, self._scalars, self._plans = {}, {}, {}
        # each parameter's random stream: its place in the optimizer, the same on every rank and in every run
        self._index_of = {id(p): i for i, p in enumerate((p for g in self.param_groups for p in g["params"]), 1)}

    def _kernel(self, fn):
        """fn, or fn compiled once for this optimizer (a graph for each stack shape, none for new scalar values)."""
        if not self.compile:
            return fn
        if fn not in self._kernels:
            self._kernels[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
        return self._kernels[fn]

    def _scalar(self, group_index, name, value, device, dtype=torch.float32):
        """A 0-d device tensor filled with value (fill_ launches a kernel: no host-device copy, no sync)."""
        key = (group_index, name, device)
        if key not in self._scalars:
            self._scalars[key] = torch.zeros((), dtype=dtype, device=device)
        return self._scalars[key].fill_(value)

    def _stacks(self, group_index, params, world):
        key = (group_index, world, tuple(map(id, params)))
        if key not in self._plans:
            self._plans[key] = [_Stack(same, per_rank, world, self._index_of)
                                for same, per_rank in stack_groups(params, world)]
        return self._plans[key]

    def _new_step(self, group, p):
        """A step counter: a CPU tensor, read by the host with no sync (a device one for torch's fused kernels)."""
        return torch.zeros((), dtype=torch.float32, device=_local(p).device if group.get("fused") else "cpu")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = self._new_step(group, p)
                    self._init_state(group, p, self.state[p])
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)
            # the host reads a CPU counter; torch's fused kernels read their own on the device (int() would sync)
            step = None if group.get("fused") else int(self.state[params[0]]["step"])
            self._step_group(group_index, group, params, step)
        return loss

    def _init_adamw_state(self, p, state):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _adamw_step(self, group_index, group, params, step):
        (beta1, beta2), device = group["betas"], _local(params[0]).device
        lr = self._scalar(group_index, "lr", group["lr"], device)
        bias1 = self._scalar(group_index, "bias1", 1 - beta1**step, device)
        bias2_sqrt = self._scalar(group_index, "bias2_sqrt", math.sqrt(1 - beta2**step), device)
        key = self._scalar(group_index, "key", step_key(self.seed, step), device, torch.int64)
        update = self._kernel(adamw_update)
        for stack in self._stacks(group_index, params, 1):
            weights = [_local(p) for p in stack.params]
            exp_avgs = [_local(self.state[p]["exp_avg"]) for p in stack.params]
            exp_avg_sqs = [_local(self.state[p]["exp_avg_sq"]) for p in stack.params]
            stacked = [_stacked(t, stack.slots) for t in (weights, [_local(p.grad) for p in stack.params], exp_avgs,
                                                          exp_avg_sqs)]
            update(*stacked, lr, bias1, bias2_sqrt, beta1, beta2, group["eps"], group["weight_decay"], key, stack.ids,
                   stack.first_element)
            for tensors, s in zip((weights, exp_avgs, exp_avg_sqs), stacked[:1] + stacked[2:]):
                _unstack(tensors, s)


class AdamW(_StackedOptimizer):
    """AdamW (arXiv 1711.05101) as torch.optim.AdamW computes it, with exp_avg and exp_avg_sq in the parameter's
    dtype, for bf16 weights (stochastic rounding). The state's names match torch's, so a checkpoint of either loads
    into the other (the state is cast to the parameter's dtype)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, seed=0, compile=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), seed, compile)

    def _init_state(self, group, p, state):
        self._init_adamw_state(p, state)

    def _step_group(self, group_index, group, params, step):
        self._adamw_step(group_index, group, params, step)


class Muon(_StackedOptimizer):
    """Muon on the groups with muon=True (2-D weight matrices), AdamW on the others (embedding, head, norm gains):
    torch's fused kernel for fp32 weights (the group's 'fused'), the stacked step with stochastic rounding for bf16.

    A Muon step: momentum buffer m <- lerp(m, g, 1 - mu); Nesterov update u = lerp(g, m, mu); O = orthogonalize(u);
    w <- w (1 - lr wd) - lr sqrt(max(1, rows / cols)) O (the shape factor of Jordan's Muon, torch's 'original').
    mu warms up linearly from momentum_start to momentum over momentum_warmup_steps (nanochat: 0.85 -> 0.95 over 300
    steps), since early gradients change fast. With momentum_warmup_steps=0 and fp32 weights a step is
    torch.optim.Muon's when the orthogonalization runs in bf16, as torch's always does (ns_dtype=torch.bfloat16;
    the default None lets orthogonalize choose by device). The momentum buffer lives in the parameter's dtype (4
    bytes a parameter, or 2 with bf16 weights: half of AdamW's state)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 momentum_start=0.85, momentum_warmup_steps=300, nesterov=True, seed=0, ns_dtype=None, compile=False):
        self.ns_dtype = ns_dtype
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, muon=False, momentum=momentum,
            momentum_start=momentum_start, momentum_warmup_steps=momentum_warmup_steps, nesterov=nesterov), seed,
            compile)
        for group in self.param_groups:
            odd = [tuple(p.shape) for p in group["params"] if group["muon"] and p.dim() != 2]
            if odd:
                raise ValueError(f"Muon orthogonalizes 2-D matrices; its group holds parameters of shapes {odd}")
            if not group["muon"]:
                group.setdefault("fused", all(p.dtype == torch.float32 for p in group["params"]))

    def _init_state(self, group, p, state):
        if group["muon"]:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            self._init_adamw_state(p, state)

    def _step_group(self, group_index, group, params, step):
        if group["muon"]:
            self._muon_step(group_index, group, params, step)
        elif group["fused"]:
            self._fused_adamw_step(group, params)
        else:
            self._adamw_step(group_index, group, params, step)

    def _fused_adamw_step(self, group, params):
        """torch.optim.AdamW(fused=True)'s kernel on the group's (local) tensors: one call for all of them."""
        states = [self.state[p] for p in params]
        tensors = [[_local(t) for t in ts] for ts in (params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                                      [s["exp_avg_sq"] for s in states])]
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(*tensors, [], [s["step"] for s in states], amsgrad=False, lr=group["lr"], beta1=beta1,
                            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, group_index, group, params, step):
        mu = group["momentum"]
        if group["momentum_warmup_steps"]:
            frac = min(1.0, step / group["momentum_warmup_steps"])
            mu = group["momentum_start"] + frac * (mu - group["momentum_start"])
        device = _local(params[0]).device
        scalars = dict(mu=self._scalar(group_index, "mu", mu, device),
                       lr=self._scalar(group_index, "lr", group["lr"], device),
                       key=self._scalar(group_index, "key", step_key(self.seed, step), device, torch.int64),
                       ns_dtype=self.ns_dtype or getattr(torch, default_dtype(device.type)))
        layout = _layout(params[0])
        # Each stack's result is applied after the next stack's orthogonalization has been queued, so that its
        # collective overlaps that work
        pending = None
        for stack in self._stacks(group_index, params, layout[1]):
            result = self._orthogonalize(stack, group, scalars, layout)
            if pending:
                self._apply(*pending)
            pending = (stack, group, scalars, result)
        if pending:
            self._apply(*pending)

    def _orthogonalize(self, stack, group, scalars, layout):
        """The stack's momentum step, then this rank's share of its orthogonalization; returns (the collective still
        running or None, the stack's orthogonalized updates once it has finished)."""
        process_group, world, rank = layout
        bufs = [_local(self.state[p]["momentum_buffer"]) for p in stack.params]
        stacked_bufs, dtype = _stacked(bufs, stack.slots), scalars["ns_dtype"]
        update = self._kernel(muon_momentum)(_stacked([_local(p.grad) for p in stack.params], stack.slots),
                                             stacked_bufs, scalars["mu"], group["nesterov"], dtype, scalars["key"],
                                             stack.ids, stack.first_element)
        _unstack(bufs, stacked_bufs)
        ns = self._kernel(orthogonalize)
        if world == 1:
            return None, ns(update, dtype=dtype)
        k = stack.per_rank
        if not hasattr(stack.params[0], "device_mesh"):  # DDP: every rank has the whole matrices
            out = torch.empty_like(update)
            mine = ns(update[rank * k:(rank + 1) * k], dtype=dtype)
            return dist.all_gather_into_tensor(out, mine, group=process_group, async_op=True), out
        # FSDP: rows padded to the shard size; place j of the stack goes to rank j // k, which gets every rank's rows
        rows, cols, shard = stack.shape[0], stack.shape[1], stack.shard_rows
        send = F.pad(update, (0, 0, 0, shard - update.size(1))).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=process_group)
        whole = received.view(world, k, shard, cols).transpose(0, 1).reshape(k, world * shard, cols)[:, :rows]
        ortho = F.pad(ns(whole, dtype=dtype), (0, 0, 0, world * shard - rows)).contiguous()  # tall ones come transposed
        back = ortho.view(k, world, shard, cols).transpose(0, 1).reshape(stack.slots, shard, cols).contiguous()
        out = torch.empty_like(back)
        work = dist.all_to_all_single(out, back, group=process_group, async_op=True)
        return work, out[:, :stack.local_shape[0]]

    def _apply(self, stack, group, scalars, result):
        work, ortho = result
        if work is not None:
            work.wait()
        weights = [_local(p) for p in stack.params]
        stacked = _stacked(weights, stack.slots)
        rows, cols = stack.shape
        scale = math.sqrt(max(1.0, rows / cols))
        self._kernel(muon_update)(stacked, ortho, scalars["lr"], group["weight_decay"], scale, scalars["key"],
                                  stack.ids, stack.first_element)
        _unstack(weights, stacked)


class Adafactor(_StackedOptimizer):
    """Adafactor (Shazeer & Stern, arXiv 1804.04235, Alg. 4 and 5): the second moment of a matrix is factored into
    fp32 row and column means (of the last two dims); no first moment; beta2_t = 1 - t^-0.8 (Sec. 7.2); updates
    clipped to RMS <= clip_threshold (d = 1, Sec. 6), all on the device. Unlike torch.optim.Adafactor, lr is an
    absolute step as in AdamW (the paper's relative step and parameter scaling are off), so the same --lr means
    the same step size under both optimizers; decoupled weight decay lr * weight_decay as AdamW. One parameter at a
    time (no stacks)."""

    def __init__(self, params, lr=1e-3, eps=1e-30, clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay), seed)

    def _init_state(self, group, p, state):
        if hasattr(p, "to_local"):
            raise RuntimeError("optimizer='adafactor' cannot run on FSDP-sharded weights: its row and column "
                               "statistics span the whole matrix. Use optimizer='adamw' with parallel='fsdp'.")
        if p.dim() >= 2:
            state["row_var"] = p.new_zeros(p.shape[:-1], dtype=torch.float32)
            state["col_var"] = p.new_zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32)
        else:
            state["variance"] = torch.zeros_like(p, dtype=torch.float32)

    def _step_group(self, group_index, group, params, step):
        for p in params:
            self._update(group, p, self.state[p], step)

    def _update(self, group, p, state, step):
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta2 = 1 - step ** group["decay_rate"]  # 0 at step 1: the first step takes the gradient's square as is
        g = p.grad.float()
        g2 = g * g + eps
        if "row_var" in state:
            row, col = state["row_var"], state["col_var"]
            row.lerp_(g2.mean(dim=-1), 1 - beta2)
            col.lerp_(g2.mean(dim=-2), 1 - beta2)
            # v ~ row x col / mean(row): the rank-1 factorisation of Alg. 4 (means instead of sums; same ratio)
            update = g * (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.rsqrt().unsqueeze(-2)
        else:
            state["variance"].lerp_(g2, 1 - beta2)
            update = g * state["variance"].rsqrt()
        rms = update.square().mean().sqrt()
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))  # a device tensor: no sync
        w32 = p.float()
        w32.mul_(1 - lr * wd).add_(update, alpha=-lr)
        _store(p.unsqueeze(0), w32.unsqueeze(0), step_key(self.seed, step), mix32(self._index_of[id(p)]), WEIGHT)


def group_settings(optimizer):
    """Each param group's hyperparameters (everything but the parameters), as this run built them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_group_settings(optimizer, settings):
    """After loading a checkpoint's optimizer state, which brings the writing run's hyperparameters with it: give
    every group this run's `settings` again (weight decay, betas, eps, fused; lr is set each step anyway) and keep
    each step counter where this optimizer reads it: on the parameter's device for torch's fused or capturable
    kernels, on the CPU otherwise (torch's load moves it to the device whenever the WRITER was fused, and a
    device step makes every int(step) in the classes above a host-device sync). Returns what changed, as text."""
    changes = []
    for group, wanted in zip(optimizer.param_groups, settings):
        for key in sorted(set(group) | set(wanted)):
            if key not in ("params", "lr", "initial_lr") and group.get(key) != wanted.get(key):
                changes.append(f"{key}: checkpoint {group.get(key)!r}, this run {wanted.get(key)!r}")
        params = group["params"]
        group.clear()
        group.update(wanted, params=params)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in params:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(dtype=torch.float32, device=p.device if on_device else "cpu")
    return list(dict.fromkeys(changes))  # one line per setting, not per group


def state_bytes(optimizer):
    """Bytes of every tensor in this rank's optimizer state (its shards only, under FSDP; step counters included)."""
    return sum(_local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def full_state_bytes(optimizer):
    """Bytes of the whole optimizer state (every rank's shards together, as a checkpoint holds it) once every
    parameter has stepped, known before the first step: a parameter without state yet counts the tensors its first
    step makes, built on the meta device (torch's AdamW: exp_avg and exp_avg_sq)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                state = {}
                meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                if isinstance(optimizer, _StackedOptimizer):
                    optimizer._init_state(group, meta, state)
                else:
                    state = {"exp_avg": meta, "exp_avg_sq": meta}
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def check_settings(lr, min_lr, lr_scale, betas, muon_lr=0.0, name="adamw", sharded=False):
    """Raise a ValueError naming the values when train.py's optimizer settings cannot train (LRs, betas, an
    optimizer `name` that cannot step FSDP shards when `sharded`). lr, min_lr and muon_lr are per sequence;
    lr_scale = sqrt(global batch in sequences) multiplies them."""
    if sharded and name == "adafactor":
        raise ValueError("optimizer='adafactor' cannot run with parallel='fsdp': its factored row and column "
                         "statistics span whole matrices, which FSDP splits over ranks. Use --optimizer=adamw (with "
                         "--param_dtype=bfloat16 for 8 bytes a parameter), or parallel='ddp'")
    beta1, beta2 = betas
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):  # Adam's bias corrections divide by 1 - beta^step
        raise ValueError(f"beta1={beta1:g}, beta2={beta2:g}: both must lie in [0, 1), e.g. --beta1=0.9 --beta2=0.95")
    fp32_max = torch.finfo(torch.float32).max
    for key, value in (("lr", lr), ("min_lr", min_lr), ("muon_lr", muon_lr)):
        # An infinite LR turns every weight into inf or NaN at once; AdamW's first step computes lr / (1 - beta1) as
        # an fp32 number, which must not overflow either.
        scaled = value * lr_scale
        if not (math.isfinite(scaled) and 0 <= scaled / (1 - beta1) <= fp32_max):
            raise ValueError(f"{key}={value:g} gives an LR of {value:g} x sqrt({lr_scale ** 2:g}) = {scaled:g}; it "
                             f"must be a finite number >= 0, below float32's {fp32_max:.3g} x (1 - beta1) (lr is for "
                             f"a global batch of one sequence, e.g. --{key}=1e-4)")
    if min_lr > lr:
        raise ValueError(f"min_lr={min_lr} is above lr={lr}; the schedule decays from lr down to min_lr")


def param_groups(model, weight_decay, muon=False):
    """The parameter groups, as [(name, {"params", "weight_decay", "muon"})]: weight decay on matrices only (every >= 2-D
    weight, embedding and head included, as in nanoGPT), none on norm gains and scalars. With muon=True the weights of
    the Blocks' linear layers (attention q/k/v/o, feed-forward, value-embedding gates) form a Muon group of their own;
    the embeddings (the token's and the layers' value embeddings) and head stay with AdamW, whose per-element steps
    suit their sparse, per-token gradients (as in nanochat and modded-nanogpt), as do the scalars."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_blocks = {id(m.weight) for m in model.layers.modules() if isinstance(m, torch.nn.Linear)}
    matrices = [p for p in params if p.dim() >= 2 and not (muon and id(p) in in_blocks)]
    groups = [("adamw, decayed", {"params": matrices, "weight_decay": weight_decay, "muon": False}),
              ("adamw, not decayed", {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
                                      "muon": False})]
    if muon:
        groups.insert(0, ("muon", {"params": [p for p in params if p.dim() == 2 and id(p) in in_blocks],
                                   "weight_decay": 0.0, "muon": True}))
    return groups


def describe_groups(model, name, weight_decay, lr, muon_lr):
    """One line per parameter group of optimizer `name`: the optimizer that steps it, its tensors and parameters, its
    peak LR and weight decay (for the plan train.py prints at start; model may be on the meta device)."""
    lines = []
    for label, g in param_groups(model, weight_decay, muon=name == "muon"):
        label = label if name == "muon" else label.replace("adamw", name)
        lines.append(f"  {label}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} "
                     f"parameters, peak lr {muon_lr if g['muon'] else lr:.3e}, weight decay {g['weight_decay']:g}")
    return "\n".join(lines)


def step_bytes(model, name, param_dtype):
    """The most memory a step of optimizer `name` takes beyond its state, an upper estimate for memory planning: five
    fp32 working copies of its largest stack (an eager step makes them; compiled kernels fuse most away), or of the
    largest parameter for Adafactor's one-at-a-time step; none for torch's fused AdamW on fp32 weights, which
    works in place. The model may be on the meta device."""
    if name == "adamw" and param_dtype == "float32":
        return 0
    if name == "adafactor":
        return 5 * 4 * max(p.numel() for p in model.parameters())
    stacked = [group["params"] for _, group in param_groups(model, 0.0, muon=name == "muon")
               if group["muon"] or param_dtype == "bfloat16"]  # the AdamW beside Muon is torch's fused one on fp32
    return 5 * 4 * max(per_rank * same[0].numel() for params in stacked for same, per_rank in stack_groups(params, 1))


def make_optimizer(model, name, param_dtype, lr, betas, weight_decay, seed, device_type, muon_lr=None, compile=False):
    """The optimizer of train.py (and the tools) over param_groups(model, ...). fp32 weights with 'adamw':
    torch.optim.AdamW (fused on CUDA); bf16 weights, 'adafactor' or 'muon': the classes above, Muon's and AdamW's
    kernels compiled with compile=True. Every group carries its peak_lr (muon_lr for the Muon group, lr for the
    others), which the LR schedule multiplies."""
    groups = [g for _, g in param_groups(model, weight_decay, muon=name == "muon")]
    for g in groups:
        g["peak_lr"] = g["lr"] = muon_lr if g["muon"] else lr
    if name == "muon":
        return Muon(groups, lr=lr, betas=betas, seed=seed, compile=compile)
    for g in groups:
        del g["muon"]
    if name == "adamw" and param_dtype == "float32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, seed=seed, compile=compile)
    return Adafactor(groups, lr=lr, seed=seed)
