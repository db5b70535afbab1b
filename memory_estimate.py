"""
Predict the peak device memory of one training step for a config, per rank: bench.py --what=memory, and the
message of a step that ran out of memory (train.py, bench.py).

    python -m tools.bench config/deepone_1b7.py --what=memory --gpu_gb=24
    python -m tools.bench config/deepone_1b7.py --what=memory --parallel=fsdp --ranks=8 --gpu_gb=24

Nothing here is a restated formula for bytes a parameter. Weights, gradients and optimizer state are counted from
the real tensors after one optimizer step of a scaled-down model (2 layers, d_model 64, vocab 1024) built with the
same family, param_dtype and optimizer, then scaled to the full model's parameter count (on the meta device).
Activations are the bytes autograd saves for backward, counted with saved_tensors_hooks on the CPU for one Block
at the full width and for the final norm + head + loss, each at two token counts (a fixed part + a per-token part),
then scaled to the layers and tokens of a micro-step. With compile=True (train.py's default) the Block is compiled
first, as train.py compiles it, and its bytes are those the compiled graph saves: against three H100
measurements with compile the predicted peaks were 1-11% above the measured ones; eager layers'
(--compile=False) were 35-66% above. Attention is measured with sdpa's causal kernel, which saves
what flex_attention and flash attention save (q, k, v, output, log-sum-exp). Added on top: the fp32 working copies
of the optimizer step's largest stack of parameters (optim.step_bytes), the head's fp32 logits chunk, and under FSDP
two gathered Blocks plus the root's gathered embedding and head. The prediction is of
torch.cuda.max_memory_allocated; leave `reserve_gb` for the CUDA context and allocator fragmentation. GB here =
2^30 bytes.
"""
import dataclasses
import sys
from contextlib import nullcontext

import torch

import optim
from machine import memory_of
from model import ModelConfig, Transformer, recompute_interval, rope_tables

GiB = 2**30


def state_bytes(model, opt):
    """Bytes of weights, gradients and optimizer state of this rank, counted from the tensors (a tied weight once;
    DTensors by their local shard)."""
    params = {p.data_ptr(): optim._local(p) for p in model.parameters()}.values()
    grads = [optim._local(p.grad) for p in model.parameters() if p.grad is not None]
    return {"weights": sum(t.numel() * t.element_size() for t in params),
            "grads": sum(t.numel() * t.element_size() for t in {g.data_ptr(): g for g in grads}.values()),
            "optimizer": optim.state_bytes(opt)}


def small_config(cfg):
    kv_ratio = cfg["n_head"] // (cfg["n_kv_head"] or cfg["n_head"])
    return ModelConfig(family=cfg["family"], vocab_size=1024, block_size=32, n_layer=2, n_head=2 * kv_ratio,
                       n_kv_head=2, d_model=64 * kv_ratio, d_ff=128 * kv_ratio, tie_embeddings=cfg["tie_embeddings"],
                       qk_norm=cfg["qk_norm"], attn_impl="sdpa")


def bytes_per_param(cfg):
    """{'weights', 'grads', 'optimizer'}: bytes per parameter after one step of the scaled-down model on the CPU."""
    torch.manual_seed(0)
    model = Transformer(small_config(cfg)).to(dtype=getattr(torch, cfg["param_dtype"]))
    opt = optim.make_optimizer(model, cfg["optimizer"], cfg["param_dtype"], 1e-4, (0.9, 0.95), 0.1, 0, "cpu",
                               muon_lr=1e-3)
    x = torch.randint(0, 1024, (1, 32))
    with torch.autocast("cpu", torch.bfloat16, enabled=cfg["dtype"] == "bfloat16"):
        _, loss = model(x, x)
    loss.backward()
    opt.step()
    n = model.num_params()
    return {k: v / n for k, v in state_bytes(model, opt).items()}


def saved_bytes(fn, exclude=()):
    """Bytes of the distinct tensors autograd saves for backward while fn() runs (parameters in exclude left out)."""
    skip = {t.data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(cfg, dtype):
    """(block_fixed, block_per_token, block_input_per_token, head_fixed, head_per_token) in bytes, measured."""
    full = ModelConfig.from_dict(cfg, attn_impl="sdpa", vocab_size=1024)  # the head's V x d part scales below
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(full, n_layer=1)).to(dtype=getattr(torch, cfg["param_dtype"]))
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
    block, params = model.layers[0], list(model.parameters())
    x_dtype = torch.bfloat16 if cfg["param_dtype"] == "bfloat16" else torch.float32
    # With compile, the Block as train.py runs it: inductor's partitioner saves about 30% fewer bytes per token than
    # eager autograd (deepone d640: 29.1 vs 40.6 kB per token and layer in bf16). Compiled for the CPU here; what a
    # graph saves is decided before code generation, so the GPU's graphs save the same. The head + loss stays eager:
    # its saved gradients are the same compiled, except that with one chunk of rows (as at the small token counts
    # measured here) the graph keeps grad_w as the chunk's bf16 matmul, half the real fp32 sum.
    run = torch.compile(block, dynamic=False) if cfg.get("compile") else block

    def block_bytes(T):
        x = torch.randn(1, T, full.d_model, dtype=x_dtype, requires_grad=True)
        x0 = torch.randn(1, T, full.d_model, dtype=x_dtype) if full.x0_mixing else None
        idx = torch.randint(0, full.vocab_size, (1, T))  # for a value embedding (the one layer here has one)
        cos, sin = rope_tables(torch.arange(T), full.head_dim, full.rope_theta)
        # Past dynamo's limit of graphs per function (a process that measured many shapes) it would run the Block
        # eagerly without a word: a higher limit, and an error rather than silence
        limits = (torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)
                  if run is not block else nullcontext())
        with autocast, limits:
            return saved_bytes(lambda: run(x, cos, sin, None, None, x0, idx), exclude=params)

    def head_bytes(T):
        h = torch.randn(T, full.d_model, dtype=x_dtype, requires_grad=True)
        y = torch.randint(0, 1024, (T,))
        with autocast:
            return saved_bytes(lambda: model.loss_fn(model.norm(h), model.lm_head.weight, y), exclude=params)
    t1, t2 = 64, 128
    try:
        b1, b2 = block_bytes(t1), block_bytes(t2)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor's CPU code here
        print(f"memory_estimate.py: cannot compile the Block on this machine's CPU ({str(e).strip().splitlines()[0]}); "
              f"predicting for eager layers, which save more: the peak is overestimated", file=sys.stderr)
        run = block
        b1, b2 = block_bytes(t1), block_bytes(t2)
    h1, h2 = head_bytes(t1), head_bytes(t2)
    per_token, head_per_token = (b2 - b1) / (t2 - t1), (h2 - h1) / (t2 - t1)
    head_fixed = (h1 - head_per_token * t1) * cfg["vocab_size"] / 1024  # grad_w: vocab x d_model
    x_bytes = full.d_model * torch.tensor([], dtype=x_dtype).element_size()
    return max(0.0, b1 - per_token * t1), per_token, x_bytes, head_fixed, head_per_token


def predict(cfg, ranks):
    """Per-rank bytes of each part and the predicted peak, as a dict of GB figures."""
    with torch.device("meta"):
        big = Transformer(ModelConfig.from_dict(cfg, attn_impl="sdpa"))
    n_params = big.num_params()
    # FSDP gathers one Block at a time: the largest (value embeddings sit in every other one)
    block_params = max(sum(p.numel() for p in layer.parameters()) for layer in big.layers)
    root_params = n_params - sum(p.numel() for p in big.layers.parameters())
    fsdp = cfg["parallel"] == "fsdp" and ranks > 1
    shards = ranks if fsdp else 1
    per_param = bytes_per_param(cfg)
    state = {k: v * n_params / shards for k, v in per_param.items()}
    dtype = cfg["dtype"]
    fixed, per_token, x_bytes, head_fixed, head_per_token = activation_bytes(cfg, dtype)
    tokens = cfg["batch_size"] * cfg["block_size"]
    every = recompute_interval(cfg["activation_checkpointing"])
    n_ckpt = len(range(0, cfg["n_layer"], every)) if every else 0
    n_kept = cfg["n_layer"] - n_ckpt
    if fsdp:
        fixed = 0  # the mixed-precision policy gathers bf16 weights; autocast makes no per-layer weight copies
    activations = (n_kept * (fixed + per_token * tokens) + n_ckpt * x_bytes * tokens
                   + (fixed + per_token * tokens if n_ckpt else 0)  # one checkpointed Block recomputed in backward
                   + head_fixed + head_per_token * tokens
                   # fp32 logits chunk + matmul, and the softcap's slope
                   + (3 if cfg.get("logit_softcap") else 2) * min(cfg["loss_chunk_size"], tokens) * cfg["vocab_size"] * 4)
    compute_bytes = 2 if dtype == "bfloat16" else 4
    stored_bytes = 4 if cfg["param_dtype"] == "float32" else 2
    # weights + fp32 grads: the Blocks gathered in the compute dtype, the root (embedding, head) in its stored dtype
    gathered = (2 * block_params * (compute_bytes + 4) + root_params * (stored_bytes + 4)) if fsdp else 0
    step_temp = optim.step_bytes(big, cfg["optimizer"], cfg["param_dtype"]) / shards
    persistent = sum(state.values())
    peak = persistent + max(activations + gathered, step_temp)
    gb = lambda b: round(b / GiB, 2)  # noqa: E731
    return {"params_M": round(n_params / 1e6, 1), "ranks": ranks if fsdp else 1,
            "weights_B_per_param": round(per_param["weights"], 2), "grads_B_per_param": round(per_param["grads"], 2),
            "optim_B_per_param": round(per_param["optimizer"], 2),
            "weights_GB": gb(state["weights"]), "grads_GB": gb(state["grads"]), "optimizer_GB": gb(state["optimizer"]),
            "activations_GB": gb(activations), "act_MB_per_1k_tokens_per_layer": round(per_token * 1000 / 2**20, 2),
            "fsdp_gathered_GB": gb(gathered), "optimizer_step_temp_GB": gb(step_temp),
            "predicted_peak_GB": gb(peak)}


def out_of_memory_message(cfg, where, ranks=1):
    """One message for a step (where) that ran out of memory under cfg (device and dtype resolved): the device's
    memory, the peak predict() gives for cfg, and the keys that shrink it, each with its value for this run."""
    name, total = memory_of(cfg["device"])
    try:
        prediction = (f"memory_estimate.py predicts a peak of {predict(cfg, ranks)['predicted_peak_GB']:.2f} GiB per "
                      f"rank for this config")
    except Exception as e:  # the advice stands without it
        prediction = f"no prediction of its peak ({type(e).__name__}: {e})"
    ways = []
    if cfg["batch_size"] > 1:
        smaller = cfg["batch_size"] // 2 if cfg["batch_size"] % 2 == 0 else 1
        ways.append(f"--batch_size={smaller} --grad_accum={cfg['grad_accum'] * cfg['batch_size'] // smaller} (the "
                    f"same tokens per step)")
    if cfg["activation_checkpointing"] not in ("all", 1):
        ways.append("--activation_checkpointing=all (activations recomputed in backward)")
    if cfg["param_dtype"] == "float32":
        ways.append("--param_dtype=bfloat16 (8 bytes a parameter, not 16)")
    if cfg["parallel"] != "fsdp":
        ways.append("--parallel=fsdp under torchrun (weights, gradients and optimizer state sharded over the ranks)")
    return (f"out of memory in {where} on {name} ({total / GiB:.1f} GiB); {prediction}. "
            + (f"To shrink it: {'; '.join(ways)}." if ways else "Use a smaller model or block_size."))
