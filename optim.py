"""
Memory-lean, sync-free optimizers for bf16 weights: AdamW and Adafactor with stochastic rounding. Used by train.py
(param_dtype='bfloat16', or optimizer='adafactor') and bench.py --what=memory.

    from optim import AdamW, Adafactor
    opt = AdamW(groups, lr=3e-4, betas=(0.9, 0.95), seed=1337)    # like torch.optim.AdamW
    opt = Adafactor(groups, lr=3e-4, seed=1337)                    # lr in AdamW's units (an absolute step)

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
                    self._init_state(p, state)
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

    def _init_state(self, p, state):
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


class Adafactor(_SyncFreeOptimizer):
    """Adafactor (Shazeer & Stern, arXiv 1804.04235, Alg. 4 and 5): the second moment of a matrix is factored into
    fp32 row and column means (of the last two dims); no first moment; beta2_t = 1 - t^-0.8 (Sec. 7.2); updates
    clipped to RMS <= clip_threshold (d = 1, Sec. 6), all on the device. Unlike torch.optim.Adafactor, lr is an
    absolute step as in AdamW (the paper's relative step and parameter scaling are off), so the same --lr means
    the same step size under both optimizers; decoupled weight decay lr * weight_decay as AdamW."""

    def __init__(self, params, lr=1e-3, eps=1e-30, clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay), seed)

    def _init_state(self, p, state):
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


def settings_problem(lr, min_lr, lr_scale, betas):
    """What is wrong with train.py's LR and betas, in one message naming the values, or '' when they are fine. lr and
    min_lr are per sequence; lr_scale = sqrt(global batch in sequences) multiplies them."""
    beta1, beta2 = betas
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):  # Adam's bias corrections divide by 1 - beta^step
        return f"beta1={beta1:g}, beta2={beta2:g}: both must lie in [0, 1), e.g. --beta1=0.9 --beta2=0.95"
    fp32_max = torch.finfo(torch.float32).max
    for key, value in (("lr", lr), ("min_lr", min_lr)):
        # An infinite LR turns every weight into inf or NaN at once; AdamW's first step computes lr / (1 - beta1) as
        # an fp32 number, which must not overflow either.
        scaled = value * lr_scale
        if not (math.isfinite(scaled) and 0 <= scaled / (1 - beta1) <= fp32_max):
            return (f"{key}={value:g} gives an LR of {value:g} x sqrt({lr_scale ** 2:g}) = {scaled:g}; it must be a "
                    f"finite number >= 0, below float32's {fp32_max:.3g} x (1 - beta1) (lr is for a global batch of "
                    f"one sequence, e.g. --{key}=1e-4)")
    if min_lr > lr:
        return f"min_lr={min_lr} is above lr={lr}; the cosine decays from lr down to min_lr"
    return ""


def make_optimizer(model, name, param_dtype, lr, betas, weight_decay, seed, device_type):
    """train.py's and bench.py's optimizer: weight decay on matrices only (model.configure_optimizer's groups).
    fp32 weights with 'adamw': torch.optim.AdamW (fused on CUDA); bf16 weights, or 'adafactor': the classes above."""
    adamw = model.configure_optimizer(weight_decay, lr, betas, device_type)
    if name == "adamw" and param_dtype == "float32":
        return adamw
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups]
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, seed=seed)
    return Adafactor(groups, lr=lr, seed=seed)
