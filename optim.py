"""
The optimizers of train.py: Muon with AdamW, and memory-lean, sync-free AdamW and Adafactor with stochastic rounding
for bf16 weights; the parameter groups each one gets (make_optimizer). Used by train.py, bench.py and memory.py.

    from optim import AdamW, Adafactor, Muon
    opt = AdamW(groups, lr=3e-4, betas=(0.9, 0.95), seed=1337)    # like torch.optim.AdamW
    opt = Adafactor(groups, lr=3e-4, seed=1337)                    # lr in AdamW's units (an absolute step)
    opt = Muon(groups, lr=3e-4, betas=(0.9, 0.95), seed=1337)     # groups with muon=True: Muon; the rest: AdamW

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon) orthogonalizes each weight matrix's Nesterov momentum
with a quintic Newton-Schulz iteration, as torch.optim.Muon does; here it also runs on bf16 weights (stochastic
rounding), on FSDP2 shards (each matrix's momentum is gathered for the orthogonalization: one all-gather of the
matrix a step, and the whole matrix in memory once, on every rank) and without host-device syncs.

State lives in the parameter's dtype: with bf16 weights, AdamW holds bf16 weights, gradients and two bf16 moments,
8 bytes a parameter instead of 16; Adafactor holds factored fp32 row and column statistics, about 4 bytes a
parameter with bf16 weights. Each step computes in fp32 and writes bf16 back with stochastic rounding, which is
unbiased: updates far below a bf16 weight's resolution (2^-8 relative) still move it on average (Zamirai et al.,
arXiv 2010.06192). With fp32 weights the step is plain fp32, equal to torch.optim.AdamW up to rounding.

No step reads a device value on the host (torch.optim.Adafactor calls .item() once per parameter per step, a GPU sync
each): the step count is a CPU tensor, the random bits come from a per-parameter generator seeded from (seed, step,
parameter index, rank), so every rank rounds a replicated weight the same way and a resumed run rounds as an
uninterrupted one. Parameters may be FSDP2 DTensors: the step works on each rank's local shard.
"""
import math

import torch
import torch.distributed as dist

from parallel import local as _local  # a DTensor's local shard, a view: in-place ops on it change the DTensor
from runtime import default_dtype

CHUNK = 1 << 24  # elements per slice of AdamW's fp32 working copies: 5 x 64 MB at most


def stochastic_round_to_bf16(x, generator=None):
    """fp32 x -> bf16, rounding away from zero with probability (dropped low 16 bits) / 2^16, so E[result] = x.
    Adding 16 random bits to the fp32 bit pattern and truncating does exactly that (a carry moves to the next
    bf16 value, across binades too); inf and nan stay as they are."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = noise.add_(x.view(torch.int32)).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class _SyncFreeOptimizer(torch.optim.Optimizer):
    """Shared part: the per-parameter loop, fp32 working copies and the stochastic write-back."""

    def __init__(self, params, defaults, seed):
        super().__init__(params, defaults)
        self.seed = seed
        self._generators = {}
        # Each rank holds different shards of a DTensor: they need different random bits.
        self._rank = dist.get_rank() if dist.is_initialized() else 0

    def _generator(self, device, step, index, sharded):
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        key = (self.seed, step, index, self._rank if sharded else 0)
        gen.manual_seed(hash(key) & (2**63 - 1))  # host-side: no sync; hash of an int tuple is stable across runs
        return gen

    @staticmethod
    def _write(target, value, gen):
        """Store the fp32 value into target (its dtype): stochastic rounding for bf16, a copy otherwise."""
        if target.dtype == torch.bfloat16:
            target.copy_(stochastic_round_to_bf16(value, gen))
        elif target.data_ptr() != value.data_ptr():
            target.copy_(value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU, as torch's own optimizers
                    self._init_state(group, p, state)
                state["step"] += 1
                step = int(state["step"])  # a CPU tensor: no device sync
                sharded = hasattr(p, "to_local")
                gen = self._generator(_local(p).device, step, index, sharded)
                self._update(group, p, _local(p), _local(p.grad), state, step, gen)
        return loss


class AdamW(_SyncFreeOptimizer):
    """AdamW (arXiv 1711.05101) as torch.optim.AdamW computes it (decoupled decay, bias-corrected moments), with
    exp_avg and exp_avg_sq in the parameter's dtype. The state's names match torch's, so a checkpoint of either
    loads into the other (the state is cast to the parameter's dtype)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), seed)

    def _init_state(self, group, p, state):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group, p, w, grad, state, step, gen):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        m_all, v_all = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        # Elementwise, so a big matrix (the 50k-row embedding) goes in slices: its fp32 working copies stay small.
        for w_s, g_s, m_s, v_s in zip(*(t.view(-1).split(CHUNK) for t in (w, grad, m_all, v_all))):
            w32, g, m, v = w_s.float(), g_s.float(), m_s.float(), v_s.float()  # no copy when already fp32
            w32.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
            w32.addcdiv_(m, denom, value=-lr / bias1)
            self._write(m_s, m, gen)
            self._write(v_s, v, gen)
            self._write(w_s, w32, gen)


# The quintic Newton-Schulz iteration's coefficients and step count of Keller Jordan's Muon, chosen to raise small
# singular values fast; torch.optim.Muon uses the same (its DEFAULT_A, _B, _C).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g, steps=NS_STEPS, eps=1e-7, dtype=None):
    """A matrix close to U V^T, where g = U S V^T: the quintic Newton-Schulz iteration, in `dtype` (default: bf16
    where its matmuls are native, as torch.optim.Muon always computes it; fp32 on a CPU without AVX512-BF16 or AMX,
    where emulated bf16 makes the iteration some 40 x slower than fp32). It does not converge to 1: the singular
    values land in about [0.7, 1.2] (Jordan: "S' ~ Uniform(0.5, 1.5)"), which trains as well as the exact U V^T.
    Returns a matrix of that dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or getattr(torch, default_dtype(g.device.type)))
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: every singular value starts <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


class Muon(AdamW):
    """Muon on the groups with muon=True (2-D weight matrices), AdamW on the others (embedding, head, norm gains).

    A Muon step: momentum buffer m <- lerp(m, g, 1 - mu); Nesterov update u = lerp(g, m, mu); O = orthogonalize(u);
    w <- w (1 - lr wd) - lr sqrt(max(1, rows / cols)) O (the shape factor of Jordan's Muon, torch's 'original').
    mu warms up linearly from momentum_start to momentum over momentum_warmup_steps (nanochat: 0.85 -> 0.95 over 300
    steps), since early gradients change fast. With momentum_warmup_steps=0 and fp32 weights a step is
    torch.optim.Muon's when the orthogonalization runs in bf16, as torch's always does (ns_dtype=torch.bfloat16;
    the default None lets orthogonalize choose by device). The momentum buffer lives in the parameter's dtype (4
    bytes a parameter, or 2 with bf16 weights: half of AdamW's state)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 momentum_start=0.85, momentum_warmup_steps=300, nesterov=True, seed=0, ns_dtype=None):
        self.ns_dtype = ns_dtype
        _SyncFreeOptimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, muon=False, momentum=momentum,
            momentum_start=momentum_start, momentum_warmup_steps=momentum_warmup_steps, nesterov=nesterov), seed)
        for group in self.param_groups:
            odd = [tuple(p.shape) for p in group["params"] if group["muon"] and p.dim() != 2]
            if odd:
                raise ValueError(f"Muon orthogonalizes 2-D matrices; its group holds parameters of shapes {odd}")

    def _init_state(self, group, p, state):
        if group["muon"]:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            super()._init_state(group, p, state)

    def _update(self, group, p, w, grad, state, step, gen):
        if not group["muon"]:
            return super()._update(group, p, w, grad, state, step, gen)
        mu = group["momentum"]
        if group["momentum_warmup_steps"]:
            frac = min(1.0, step / group["momentum_warmup_steps"])
            mu = group["momentum_start"] + frac * (mu - group["momentum_start"])
        buf = _local(state["momentum_buffer"])
        g, m = grad.float(), buf.float()
        m.lerp_(g, 1 - mu)
        update = g.lerp(m, mu) if group["nesterov"] else m
        self._write(buf, m, gen)
        if hasattr(p, "to_local"):  # an FSDP2 shard holds some rows: orthogonalize the whole matrix, keep ours
            from torch.distributed.tensor import DTensor
            whole = DTensor.from_local(update, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride()).full_tensor()
            ortho = _own_rows(orthogonalize(whole, dtype=self.ns_dtype), p, w)
        else:
            ortho = orthogonalize(update, dtype=self.ns_dtype)
        rows, cols = p.shape
        w32 = w.float()
        w32.mul_(1 - group["lr"] * group["weight_decay"])
        w32.add_(ortho.float(), alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))
        self._write(w, w32, gen)


def _own_rows(whole, p, local_shard):
    """This rank's rows of a whole matrix, as FSDP2 shards dim 0: torch.chunk over the ranks (ranks past the last
    chunk hold none)."""
    from torch.distributed.tensor import Shard
    if tuple(p.placements) != (Shard(0),):
        raise RuntimeError(f"Muon expects FSDP2's dim-0 sharding, got {p.placements}")
    chunks = whole.chunk(p.device_mesh.size(), dim=0)
    rank = p.device_mesh.get_local_rank()
    rows = chunks[rank] if rank < len(chunks) else whole[:0]
    if rows.shape != local_shard.shape:  # FSDP sharded otherwise than torch.chunk: the update would go astray
        raise RuntimeError(f"Muon: this rank's rows of a {tuple(whole.shape)} matrix are {tuple(rows.shape)} by "
                           f"torch.chunk, but its FSDP shard is {tuple(local_shard.shape)}")
    return rows


class Adafactor(_SyncFreeOptimizer):
    """Adafactor (Shazeer & Stern, arXiv 1804.04235, Alg. 4 and 5): the second moment of a matrix is factored into
    fp32 row and column means (of the last two dims); no first moment; beta2_t = 1 - t^-0.8 (Sec. 7.2); updates
    clipped to RMS <= clip_threshold (d = 1, Sec. 6), all on the device. Unlike torch.optim.Adafactor, lr is an
    absolute step as in AdamW (the paper's relative step and parameter scaling are off), so the same --lr means
    the same step size under both optimizers; decoupled weight decay lr * weight_decay as AdamW."""

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

    def _update(self, group, p, w, grad, state, step, gen):
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta2 = 1 - step ** group["decay_rate"]  # 0 at step 1: the first step takes the gradient's square as is
        g = grad.float()
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
        w32 = w.float()
        w32.mul_(1 - lr * wd).add_(update, alpha=-lr)
        self._write(w, w32, gen)


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


def settings_problem(lr, min_lr, lr_scale, betas, muon_lr=0.0, name="adamw", sharded=False):
    """What is wrong with train.py's optimizer settings (LRs, betas, an optimizer `name` that cannot step FSDP shards
    when `sharded`), in one message naming the values, or '' when they are fine. lr, min_lr and muon_lr are per
    sequence; lr_scale = sqrt(global batch in sequences) multiplies them."""
    if sharded and name == "adafactor":
        return ("optimizer='adafactor' cannot run with parallel='fsdp': its factored row and column statistics span "
                "whole matrices, which FSDP splits over ranks. Use --optimizer=adamw (with --param_dtype=bfloat16 for "
                "8 bytes a parameter), or parallel='ddp'")
    beta1, beta2 = betas
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):  # Adam's bias corrections divide by 1 - beta^step
        return f"beta1={beta1:g}, beta2={beta2:g}: both must lie in [0, 1), e.g. --beta1=0.9 --beta2=0.95"
    fp32_max = torch.finfo(torch.float32).max
    for key, value in (("lr", lr), ("min_lr", min_lr), ("muon_lr", muon_lr)):
        # An infinite LR turns every weight into inf or NaN at once; AdamW's first step computes lr / (1 - beta1) as
        # an fp32 number, which must not overflow either.
        scaled = value * lr_scale
        if not (math.isfinite(scaled) and 0 <= scaled / (1 - beta1) <= fp32_max):
            return (f"{key}={value:g} gives an LR of {value:g} x sqrt({lr_scale ** 2:g}) = {scaled:g}; it must be a "
                    f"finite number >= 0, below float32's {fp32_max:.3g} x (1 - beta1) (lr is for a global batch of "
                    f"one sequence, e.g. --{key}=1e-4)")
    if min_lr > lr:
        return f"min_lr={min_lr} is above lr={lr}; the schedule decays from lr down to min_lr"
    return ""


def param_groups(model, weight_decay, muon=False):
    """The parameter groups, as [(name, {"params", "weight_decay", "muon"})]: weight decay on matrices only (every >= 2-D
    weight, embedding and head included, as in nanoGPT), none on norm gains. With muon=True the Blocks' 2-D weights
    (attention q/k/v/o, feed-forward) form a Muon group of their own; the embedding and head stay with AdamW, whose
    per-element steps suit their sparse, per-token gradients (as in nanochat and modded-nanogpt)."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_blocks = {id(p) for p in model.layers.parameters()}
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


def make_optimizer(model, name, param_dtype, lr, betas, weight_decay, seed, device_type, muon_lr=None):
    """train.py's, bench.py's and memory.py's optimizer over param_groups(model, ...). fp32 weights with 'adamw':
    torch.optim.AdamW (fused on CUDA); bf16 weights, 'adafactor' or 'muon': the classes above. Every group carries
    its peak_lr (muon_lr for the Muon group, lr for the others), which the LR schedule multiplies."""
    groups = [g for _, g in param_groups(model, weight_decay, muon=name == "muon")]
    for g in groups:
        g["peak_lr"] = g["lr"] = muon_lr if g["muon"] else lr
    if name == "muon":
        return Muon(groups, lr=lr, betas=betas, seed=seed)
    for g in groups:
        del g["muon"]
    if name == "adamw" and param_dtype == "float32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, seed=seed)
    return Adafactor(groups, lr=lr, seed=seed)
