"""
smoltrain's model: one decoder-only Transformer for three families, picked by ModelConfig.family.

    deepone (default)  post-norm DeepNet layers (arXiv 2203.00555) with RoPE, per-head q/k RMSNorm,
                       ReLU-GLU feed-forward and an untied head (after Forgather's DeepOne, minus ALiBi)
    llama              pre-RMSNorm, SwiGLU, grouped-query attention, RoPE, optionally tied embeddings
    qwen3              llama plus per-head q/k RMSNorm; its preset sets rope_theta 1e6 and ties embeddings

Use:
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(family="llama", n_layer=10, n_head=8, n_kv_head=2, d_model=512))
    logits, _ = model(idx)                             # idx [B, T] -> fp32 logits [B, T, vocab]
    _, loss = model(idx, targets, doc_ids, cu_seqlens) # packed rows, as data.PackedLoader ships them
    model.compile_layers()                             # how train.py compiles
    out = model.generate(idx, max_new_tokens=50, top_k=50)

Packed rows: a token attends only to earlier tokens of its own document, under every attention backend
(attn_impl): eager (the reference), sdpa, flex_attention (recommended on GPU), flash_attention_2 (flash-attn's
varlen kernel, or torch's own torch.nn.attention.varlen when flash-attn is not installed). The mask is built once
per forward, outside compiled code, and handed to every layer. With targets the loss comes from a
chunked head + cross-entropy that never holds fp32 logits for the whole batch. Presets live in config/*.py.
"""
import importlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

FAMILIES = ("deepone", "llama", "qwen3")
FFNS = ("glu", "relu2")
ATTN_IMPLS = ("eager", "sdpa", "flex_attention", "flash_attention_2")


@dataclass
class ModelConfig:
    family: str = "deepone"
    vocab_size: int = 50304         # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 4096          # longest sequence: RoPE positions and KV-cache length
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # None -> n_head (no grouped-query attention)
    d_model: int = 768
    d_ff: int | None = None         # None -> 8/3 d_model rounded up to a multiple of 256 (glu), 4 d_model (relu2)
    ffn: str = "glu"                # 'glu': the family's GLU; 'relu2': down(relu(up(x))^2), see FeedForward
    rope_theta: float = 10000.0     # Qwen3 uses 1e6: config/qwen3_138m.py sets it
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qk_norm: bool | None = None     # None -> True for deepone and qwen3, False for llama
    attn_impl: str = "sdpa"
    loss_chunk_size: int = 4096     # rows of the flattened [B*T, d_model] hidden states per head+loss chunk
    logit_softcap: float = 0.0      # > 0: logits c tanh(z / c), inside the chunked head+loss (0: off; see
    #                                 Transformer.logits)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is unknown; choose one of {', '.join(FAMILIES)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is unknown; choose one of {', '.join(ATTN_IMPLS)}")
        sizes = {"vocab_size": self.vocab_size, "block_size": self.block_size, "n_layer": self.n_layer,
                 "n_head": self.n_head, "d_model": self.d_model, "loss_chunk_size": self.loss_chunk_size,
                 "n_kv_head": self.n_kv_head, "d_ff": self.d_ff}
        small = [f"{k}={v}" for k, v in sizes.items() if v is not None and v < 1]  # None: the default, below
        if small:
            raise ValueError(f"{', '.join(small)}: model sizes must be >= 1")
        if not self.logit_softcap >= 0:
            raise ValueError(f"logit_softcap={self.logit_softcap}: a cap c > 0 (logits c tanh(z / c)), or 0 for none")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qk_norm is None:
            self.qk_norm = self.family != "llama"
        if self.ffn not in FFNS:
            raise ValueError(f"ffn={self.ffn!r} is unknown; choose one of {', '.join(FFNS)}")
        if self.d_ff is None and self.ffn == "relu2":
            self.d_ff = 4 * self.d_model  # two matrices of 4d: the parameters of the 8/3 d GLU's three
        if self.d_ff is None:
            # A GLU has three matrices: 8/3 d keeps it at the size of a 4d two-matrix MLP (arXiv 2002.05202);
            # rounding up to a multiple of 256 is Llama's rule (768 -> 2048, 640 -> 1792, 512 -> 1536).
            self.d_ff = 256 * math.ceil(8 * self.d_model / 3 / 256)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                             f"pick n_head among the divisors of d_model")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                             f"each key/value head must serve a whole group of query heads")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_head = {self.d_model}/{self.n_head} = {self.head_dim} is odd; "
                             f"RoPE rotates pairs of dims, so choose d_model and n_head with an even quotient")

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, cfg, **overrides):
        """The ModelConfig of the model keys in cfg (a train.py-style config dict with other keys too), with
        overrides: how train.py and the tools build one."""
        return cls(**{**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}, **overrides})


def deepnet_constants(n_layer):
    """DeepNet (arXiv 2203.00555) Table 1, decoder-only column; N = number of layers.
    alpha up-weights the residual inside the post-norm, beta scales the init of the FFN, value and output
    projections, so that the size of a model update stays bounded however deep the stack."""
    alpha = (2 * n_layer) ** 0.25
    beta = (8 * n_layer) ** -0.25
    return alpha, beta


class RMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467) with a learned gain, computed in fp32 and returned in the input's dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_tables(positions, head_dim, theta):
    """cos and sin [T, head_dim/2] of RoPE (arXiv 2104.09864), always fp32. Built per forward from positions:
    it is tiny, and no buffer can be cast to bf16 by model.to(dtype) or left empty by meta-device init.
    Positions do not restart per document: RoPE scores depend only on q-k distance and a token never
    sees another document, so the absolute offset inside a packed row is irrelevant."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x [B, T, H, head_dim] pairing dim i with i + head_dim/2 (the Llama/Qwen checkpoint layout), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over batch and heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Masks: built once per forward by Transformer.build_mask, eagerly, and shared by every layer.
# doc_ids[b, t] numbers the documents of row b (0, 1, 2, ... along t); t may attend to s iff s <= t and both
# tokens belong to the same document.

def doc_causal_dense(doc_ids):
    """[B, 1, T, T] bool, True = may attend: the mask of the eager and sdpa backends."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


# The GPU flex kernels, torch.compile'd once per process and shared by every layer and model. Made by
# Transformer.__init__ when attn_impl='flex_attention', not at import (dynamo takes seconds to import), and
# never inside a traced region: compiled Blocks only read the global.
flex_attention_compiled = None
create_block_mask_compiled = None


def compile_flex_kernels():
    global flex_attention_compiled, create_block_mask_compiled
    if flex_attention_compiled is None:
        flex_attention_compiled = torch.compile(flex_attention, dynamic=False)
        create_block_mask_compiled = torch.compile(create_block_mask, dynamic=False)


def doc_causal_block_mask(doc_ids, B, T, device):
    """BlockMask for flex_attention: its block sparsity skips the (q, kv) tiles that cross documents."""
    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return q >= kv
        B = None  # one causal mask broadcast over the batch
    else:
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
    # device= explicitly: the default is the current accelerator, not the data's device.
    make = create_block_mask_compiled if device.type == "cuda" else create_block_mask  # eager is fine on CPU
    return make(mask_mod, B, None, T, T, device=device)


def doc_cu_seqlens(doc_ids, B, T, device):
    """int32 [n_docs + 1] start offsets of the documents in the flattened [B*T] batch, for callers that have
    doc_ids but no cu_seqlens (data.PackedLoader ships them: pass those, this is the fallback)."""
    if doc_ids is None:
        return torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
    starts = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True)  # every row starts a document
    # nonzero's output size depends on the data, so this is a host-device sync: the reason the loader ships
    # cu_seqlens with the batch.
    cu = starts.flatten().nonzero().flatten().to(torch.int32)
    return F.pad(cu, (0, 1), value=B * T)


def attended_pairs(cu_seqlens):
    """Unmasked (query, key) pairs of document-causal attention over a batch: sum over segments of L(L+1)/2, an
    int64 tensor on cu_seqlens' device (no sync; padding slots have L = 0). Divided by B * T^2 it is the
    attn_fraction of Transformer.flops_per_token; train.py and the benchmarks count MFU this way."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return (lengths * (lengths + 1) // 2).sum()


def _check_half(q):
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"attn_impl='flash_attention_2' runs in bf16/fp16 only and got {q.dtype}: train with "
                           f"dtype='bfloat16' (autocast), or use attn_impl='flex_attention' or 'sdpa'")


def varlen_kernel():
    """The flash_attention_2 backend's kernel, f(q, k, v [B*T, heads, hd], cu_seqlens, max_len) -> [B*T, H, hd]:
    flash-attn's when it is installed (optional, not in requirements.txt), else torch.nn.attention.varlen (torch
    2.10 and later), which needs no extra package. Both are CUDA-only and want bf16/fp16 inputs (autocast)."""
    if not torch.cuda.is_available():
        raise RuntimeError("attn_impl='flash_attention_2' needs a CUDA GPU and this machine has none; "
                           "use attn_impl='sdpa' (or 'flex_attention' for CPU inference)")
    # Imported here, inside try, not in the kernel: traced code stays import-free, and transformers' import check of
    # a trust_remote_code export (which ships this file) skips optional imports inside try blocks.
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        def flash_attn_kernel(q, k, v, cu_seqlens, max_len):  # GQA: flash-attn takes fewer k/v heads as they are
            _check_half(q)
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)
        return flash_attn_kernel
    try:
        varlen_attn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError) as e:
        raise ImportError(f"attn_impl='flash_attention_2' needs the flash-attn package (pip install flash-attn "
                          f"--no-build-isolation) or torch >= 2.10 (torch.nn.attention.varlen; this is torch "
                          f"{torch.__version__}); or use attn_impl='flex_attention' or 'sdpa'") from e

    # The keywords changed between releases: torch 2.10 takes is_causal=; 2.11 replaced it by window_size= (a
    # (left, right) band, (-1, 0) = causal); enable_gqa= arrived in 2.12. Read them from the signature once.
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params

    def torch_varlen_kernel(q, k, v, cu_seqlens, max_len):  # torch's Flash Attention 2 kernels
        _check_half(q)
        gqa = {}
        if q.size(1) != k.size(1):
            if native_gqa:
                gqa = {"enable_gqa": True}
            else:  # older releases want as many k/v heads as query heads
                rep = q.size(1) // k.size(1)
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal, **gqa)
    return torch_varlen_kernel


# ---------------------------------------------------------------------------------------------------------------
# The network

def eager_attention(q, k, v, mask):
    """The reference: explicit scores, boolean mask (True = may attend) and an fp32 softmax. q,k,v [B, H, T, hd]."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).type_as(v) @ v


class KVCache:
    """Keys and values of every layer for generate(); pos = how many positions are filled."""

    def __init__(self, n_layer, max_len):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):
        """Store k, v [B, n_kv_head, T, hd] at pos; return everything up to pos + T."""
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.attn_impl, self.layer_idx = cfg.attn_impl, layer_idx
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        # Per-head RMSNorm on q and k before RoPE (Qwen3): bounds the attention logits.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.varlen_fn = varlen_kernel() if cfg.attn_impl == "flash_attention_2" else None

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if self.attn_impl == "flash_attention_2" and kv_cache is None:
            cu_seqlens, max_len = mask  # varlen wants [B*T, heads, hd]: the projections' own layout, no transpose
            y = self.varlen_fn(q.reshape(B * T, self.n_head, self.head_dim),
                               k.reshape(B * T, self.n_kv_head, self.head_dim),
                               v.reshape(B * T, self.n_kv_head, self.head_dim), cu_seqlens, max_len)
            return self.o_proj(y.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if kv_cache is not None:
            # generate(): one sequence per row, no documents. The prefill starts at pos 0, so is_causal is right
            # (its mask is aligned top-left); a one-token step sees the whole cache.
            k, v = kv_cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif self.attn_impl == "eager":
            y = eager_attention(q, k, v, mask)
        elif self.attn_impl == "sdpa" and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif self.attn_impl == "sdpa":
            # With an attn_mask, enable_gqa sends CUDA SDPA to its math kernel (pytorch/pytorch#139586): expand
            # the kv heads instead, which keeps the memory-efficient kernel.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # flex_attention: the compiled kernel on GPU. CPU runs flex for inference only, where a cold
            # compile (~40 s) outweighs the call, so it stays eager there unless compile_layers compiles the Block.
            flex = flex_attention_compiled if q.is_cuda else flex_attention
            y = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """ffn='glu': GLU feed-forward, down(act(gate(x)) * up(x)) (arXiv 2002.05202): ReLU for deepone (its activations
    are sparse, ReLU Strikes Back arXiv 2310.04564), SiLU (SwiGLU) for llama and qwen3. ffn='relu2': two matrices,
    down(relu(up(x))^2) (Primer, arXiv 2109.08668; nanochat's and modded-nanogpt's MLP), any family."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.ffn == "glu" else None
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = F.relu if cfg.family == "deepone" else F.silu

    def forward(self, x):
        if self.gate is None:
            return self.down(F.relu(self.up(x)).square())
        return self.down(self.act(self.gate(x)) * self.up(x))

    def inputs(self):
        """The matrices that read the layer's input (gate and up, or up alone)."""
        return [lin for lin in (self.gate, self.up) if lin is not None]


class Block(nn.Module):
    """One layer. deepone is post-norm DeepNorm, x = norm(alpha * x + f(x)); llama and qwen3 are pre-norm."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.post_norm = cfg.family == "deepone"
        self.alpha = deepnet_constants(cfg.n_layer)[0] if self.post_norm else 1.0
        self.checkpointed = False  # set by Transformer.set_activation_checkpointing

    def forward(self, x, cos, sin, mask, kv_cache=None):
        if self.checkpointed and torch.is_grad_enabled() and kv_cache is None:
            # Keep only the Block's input; backward recomputes the rest. Inside forward, so that compile_layers
            # traces it and FSDP's hooks on the Block (all-gather, reshard) stay outside the recomputed region.
            return torch.utils.checkpoint.checkpoint(self.layer, x, cos, sin, mask, use_reentrant=False)
        return self.layer(x, cos, sin, mask, kv_cache)

    def layer(self, x, cos, sin, mask, kv_cache=None):
        if self.post_norm:
            x = self.attn_norm(self.alpha * x + self.attn(x, cos, sin, mask, kv_cache))
            return self.ffn_norm(self.alpha * x + self.ffn(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        return x + self.ffn(self.ffn_norm(x))


def recompute_interval(policy):
    """The activation_checkpointing setting as k, checkpointing every k-th Block: 0 for 'none' (or None, the config
    default), 1 for 'all', else the int itself; a ValueError naming the value for anything else. The one parser of
    the setting: settings.check (to refuse it before training), Transformer.set_activation_checkpointing and the
    memory estimate."""
    every = {"none": 0, "all": 1}.get(policy, policy) if isinstance(policy, str) else (0 if policy is None else policy)
    if type(every) is not int or every < 0 or (every == 0 and policy not in (None, "none")):
        raise ValueError(f"activation_checkpointing={policy!r}: use 'none', 'all' or an int k >= 1 (every k-th layer)")
    return every


# ---------------------------------------------------------------------------------------------------------------
# Memory-lean head + loss. Plain F.cross_entropy(lm_head(h).float(), targets) holds [B*T, vocab] logits in bf16
# and fp32 plus their gradient: 8 x 4096 x 50304 x 10 bytes = 16 GB. Here one chunk of rows lives at a time.

def _linear_cross_entropy(h, weight, targets, chunk_size, with_grads, per_row=False, softcap=0.0):
    """Mean cross-entropy of h @ weight.T [N, V] against targets [N] (-100 = ignore), chunk_size rows at a time.
    with_grads also returns d loss / d h and d loss / d weight; per_row (without grads) returns each row's
    cross-entropy [N] instead of the mean (0 for ignored rows). softcap > 0 caps the logits z to c tanh(z / c)
    first (its gradient, 1 - tanh^2, costs one more chunk of fp32 logits while training)."""
    valid = targets != -100
    row_weight = valid / valid.sum().clamp(min=1)  # a tensor: no host sync. No targets at all gives 0, not nan
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grads else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    # The matmuls run in the autocast dtype. Cast the head weight to it once here, not in every chunk's matmuls:
    # under torch.compile each chunk's cast was its own kernel over the whole vocab x d_model matrix (6% of a
    # deepone step on an H100). Each chunk's rows and logit gradients are cast once too, not once per matmul.
    # The same values as autocast's own casts, so the same results.
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    w = weight.to(dtype)
    rows = []
    for s in range(0, h.size(0), chunk_size):
        hc, wc = h[s:s + chunk_size].to(dtype), row_weight[s:s + chunk_size, None]
        tc = targets[s:s + chunk_size, None].clamp(min=0)  # ignored rows point at class 0, then get weight 0
        logits = F.linear(hc, w).float()  # the matmul runs in the autocast dtype, the softmax in fp32
        if softcap:
            logits = logits.div_(softcap).tanh_()
            slope = 1 - logits.square() if with_grads else None  # d cap / d z, before the in-place softmax below
            logits = logits.mul_(softcap)
        target_logit = logits.gather(1, tc)
        row_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: a chunk's logits are not needed again
        sum_exp = probs.sum(dim=-1, keepdim=True)
        if per_row:
            rows.append(((row_max + sum_exp.log() - target_logit) * (wc > 0)).squeeze(1))
            continue
        loss = loss + ((row_max + sum_exp.log() - target_logit) * wc).sum()
        if with_grads:  # d loss / d logits = (softmax - onehot(target)) * row_weight
            dlogits = probs.mul_(wc / sum_exp).scatter_add_(1, tc, -wc)
            dlogits = (dlogits.mul_(slope) if softcap else dlogits).to(dtype)
            grad_h[s:s + chunk_size] = dlogits @ w
            grad_w += dlogits.t() @ hc
    if per_row:
        return torch.cat(rows), None, None
    return loss, grad_h, (grad_w.to(weight.dtype) if with_grads else None)


class _LinearCrossEntropyFn(torch.autograd.Function):
    # Gradients are computed chunk by chunk in forward and stashed, not recomputed in backward. A chunk's logits
    # serve both its loss and its gradient, so this costs 3 head-sized matmuls instead of 4, and the stashed
    # grad_h takes the place of the h that backward would otherwise keep; grad_w is weight-sized, as its .grad
    # will be. Backward only scales them by the incoming gradient (a loss / grad_accum, say).
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, softcap):
        loss, grad_h, grad_w = _linear_cross_entropy(h, weight, targets, chunk_size, with_grads=True, softcap=softcap)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


class LinearCrossEntropy(nn.Module):
    """loss = F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100), without the full logits
    (the logits capped to c tanh(z / c) first with softcap c > 0). A module (no parameters of its own) so that
    compile_layers can compile it."""

    def __init__(self, chunk_size, softcap=0.0):
        super().__init__()
        self.chunk_size, self.softcap = chunk_size, softcap

    def forward(self, h, weight, targets, per_row=False):
        if per_row:  # evaluation: each row's cross-entropy, for sums over chosen tokens (bits per byte)
            with torch.no_grad():
                return _linear_cross_entropy(h, weight, targets, self.chunk_size, with_grads=False, per_row=True,
                                             softcap=self.softcap)[0]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropyFn.apply(h, weight, targets, self.chunk_size, self.softcap)
        return _linear_cross_entropy(h, weight, targets, self.chunk_size, with_grads=False,  # eval: no grads
                                     softcap=self.softcap)[0]


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.loss_fn = LinearCrossEntropy(config.loss_chunk_size, config.logit_softcap)
        if config.attn_impl == "flex_attention":
            compile_flex_kernels()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.config
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        _, beta = deepnet_constants(cfg.n_layer)
        for block in self.layers:
            a, f = block.attn, block.ffn
            if cfg.family == "deepone":
                # DeepNet (arXiv 2203.00555) Table 1, decoder-only: xavier_normal with gain beta = (8N)^(-1/4)
                # on the FFN, value and output projections, gain 1 on query and key.
                for lin in (a.q_proj, a.k_proj):
                    nn.init.xavier_normal_(lin.weight, gain=1.0)
                for lin in (a.v_proj, a.o_proj, *f.inputs(), f.down):
                    nn.init.xavier_normal_(lin.weight, gain=beta)
            else:
                # GPT-2 practice: N(0, 0.02), with the two projections that write into the residual stream
                # shrunk by 1/sqrt(2N) so the residual's variance does not grow with depth.
                for lin in (a.q_proj, a.k_proj, a.v_proj, *f.inputs()):
                    nn.init.normal_(lin.weight, std=0.02)
                for lin in (a.o_proj, f.down):
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def build_mask(self, doc_ids, B, T, device, cu_seqlens=None):
        """The attention mask of one forward, for every layer: None (sdpa, plain causal), a bool tensor (eager,
        sdpa), a BlockMask (flex_attention) or (cu_seqlens, max_len) (flash_attention_2)."""
        impl = self.config.attn_impl
        if impl == "flex_attention":
            return doc_causal_block_mask(doc_ids, B, T, device)
        if impl == "flash_attention_2":
            if cu_seqlens is None:
                cu_seqlens = doc_cu_seqlens(doc_ids, B, T, device)
            # max_len = T bounds every document with no .item() (a sync), and stays fixed batch after batch
            return cu_seqlens, T
        if doc_ids is not None:
            return doc_causal_dense(doc_ids)
        return torch.ones(T, T, dtype=torch.bool, device=device).tril() if impl == "eager" else None

    def hidden(self, idx, mask, kv_cache=None):
        """Final-norm hidden states [B, T, d_model] of tokens idx (at positions kv_cache.pos onwards, if cached)."""
        T, pos = idx.size(1), (kv_cache.pos if kv_cache is not None else 0)
        cos, sin = rope_tables(torch.arange(pos, pos + T, device=idx.device), self.config.head_dim,
                               self.config.rope_theta)
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, doc_ids=None, cu_seqlens=None, per_token=False):
        """(fp32 logits [B, T, vocab], None) without targets; (None, mean cross-entropy) with targets [B, T], or with
        per_token=True (evaluation, no grads) (None, each token's cross-entropy [B, T], fp32).
        doc_ids [B, T] and cu_seqlens (int32, padded) describe the same packed documents, as data.PackedLoader
        ships them: flash_attention_2 reads cu_seqlens (or derives it from doc_ids, with a sync), the others
        doc_ids. Neither: plain causal rows."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}; "
                             f"raise block_size in ModelConfig or feed shorter blocks")
        if self.config.attn_impl == "flex_attention" and idx.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("attn_impl='flex_attention' cannot train on CPU: torch's flex_attention has no CPU "
                               "backward. Use attn_impl='sdpa' on CPU (flex runs on CPU under torch.no_grad()).")
        h = self.hidden(idx, self.build_mask(doc_ids, B, T, idx.device, cu_seqlens))
        with torch.profiler.record_function("head+loss"):  # a named range: a profile shows the head apart
            if targets is None:
                return self.logits(h), None
            loss = self.loss_fn(h.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T), per_row=per_token)
            return None, loss.view(B, T) if per_token else loss

    def logits(self, h):
        """fp32 logits of final hidden states h, capped to c tanh(z / c) with logit_softcap c > 0 (Gemma 2, arXiv
        2408.00118; nanochat uses c = 15): a bounded logit keeps the softmax from growing overconfident. Every
        logit path goes through here; the loss computes the same inside its chunks."""
        z = self.lm_head(h).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(z / cap) if cap else z

    def set_activation_checkpointing(self, policy):
        """'none' | 'all' | k (int): every k-th Block (1 = all) keeps only its input for backward and recomputes
        the rest there: their activation memory for one more forward of those layers (torch.utils.checkpoint)."""
        every = recompute_interval(policy)
        for i, layer in enumerate(self.layers):
            layer.checkpointed = every > 0 and i % every == 0
        return self

    def use_float8_matmuls(self):
        """FP8 matmuls in the Blocks' linear layers: torchao's float8 training (dynamic tensorwise scales, e4m3
        activations and weights, e5m2 gradients) swaps each for a Float8Linear that keeps its weight, so checkpoints
        and exports stay as they are. The embedding, the head (its softmax is the most precision-sensitive) and the
        norms stay in the compute dtype, as in torchao's and torchtitan's recipes; so does a layer whose sizes are
        not multiples of 16 (FP8 matmul kernels need that). Call before compile_layers and the parallel wrap."""
        from torchao.float8 import convert_to_float8_training
        convert_to_float8_training(self.layers, module_filter_fn=lambda module, name: (
            isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0))

    def compile_layers(self, **compile_kwargs):
        """Compile each Block and the head+loss in place (nn.Module.compile), so state_dict keys keep no
        `_orig_mod.` prefix. The mask is built eagerly in forward and reaches the compiled layers as an input:
        a new batch's documents cause no recompile and no graph break."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        self.loss_fn.compile(**compile_kwargs)
        return self

    def num_params(self, non_embedding=False):
        """Parameters, a tied matrix counted once. non_embedding=True counts the body only: no token
        embedding and no output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, T, attn_fraction=0.5):
        """Training FLOPs (forward + backward) per token at sequence length T, for MFU:
            6 * (body params + vocab * d_model) + 12 * n_layer * d_model * T * attn_fraction
        6 = 2 FLOPs per multiply-add forward + 4 backward (PaLM, arXiv 2204.02311 App. B), over every matmul
        weight, the head included even when tied (the input embedding is a lookup). The second term is QK^T and
        AV over the attended part of the T x T scores: attn_fraction = 0.5 for causal, sum(doc_len^2) / (2 T^2)
        for packed documents if kernels skip the masked blocks (flex, flash)."""
        cfg = self.config
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * T * attn_fraction

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_kv_cache=True):
        """Append max_new_tokens sampled tokens to idx [B, T] (temperature 0 or top_k=1: greedy). With the KV
        cache, each step after the prefill feeds one token; attention there is sdpa whatever attn_impl, as
        there are no packed documents. Past block_size both paths re-read the last block_size tokens each step."""
        bs = self.config.block_size
        cache = KVCache(self.config.n_layer, bs) if use_kv_cache else None
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(idx[:, -bs:])[0][:, -1]
            else:
                if cache.pos in (0, bs):  # first step, or the window is full: (re)read it
                    cache.pos = 0
                    tokens = idx[:, -bs:]
                else:
                    tokens = idx[:, -1:]
                logits = self.logits(self.hidden(tokens, None, cache)[:, -1])
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
