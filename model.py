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

Per-token options, each a ModelConfig field, off by default (measured one by one in dev/LOG.md; none has yet won
by enough to be switched on): value_embeds, x0_mixing (with the backout before the head), smear, logit_softcap,
ffn='relu2', and window_pattern / short_window (sliding-window layers, composed with the document mask). Each works
under every attn_impl, the KV cache, compile, FSDP2, activation checkpointing and the HF export.
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
    value_embeds: bool = False      # a token embedding per alternate layer, gated into its values (see Attention)
    x0_mixing: bool = False         # learned per-layer scales of the stream and of the first embedding, and the
    #                                 backout of the mid-depth stream before the head (see Block, Transformer.hidden)
    smear: bool = False             # a gated share of the previous token's embedding in each token's (Transformer.smear)
    window_pattern: str = "L"       # each layer's attention span, the pattern tiled over the layers: L = the whole
    #                                 block, S = the last short_window tokens; the last layer is always L
    short_window: int | None = None  # tokens an S layer sees, itself included; None -> block_size/4 rounded up to a
    #                                  multiple of 128 (flex_attention's tile), at most block_size

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
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise ValueError(f"window_pattern={self.window_pattern!r}: a string of L (whole block) and S (short_window "
                             f"tokens), tiled over the layers, e.g. 'SSSL'; 'L' for full attention everywhere")
        if self.short_window is None:
            self.short_window = min(self.block_size, 128 * math.ceil(self.block_size / 4 / 128))
        if self.short_window < 1:
            raise ValueError(f"short_window={self.short_window}: the tokens an S layer attends to, >= 1")
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

    def layer_windows(self):
        """Each layer's attention window: None for the whole block, else the number of most recent tokens (itself
        included) a query sees. window_pattern is tiled over the layers and the last is always whole (nanochat's
        rule: the final layer reads the whole context)."""
        windows = [None if self.window_pattern[i % len(self.window_pattern)] == "L" or self.short_window >= self.block_size
                   else self.short_window for i in range(self.n_layer)]
        windows[-1] = None
        return windows

    def has_value_embed(self, layer_idx):
        """value_embeds puts one on every other layer, counted back from the last (which always has one): nanochat's
        placement."""
        return self.value_embeds and layer_idx % 2 == (self.n_layer - 1) % 2

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
# Masks: built once per forward by Transformer.build_masks, eagerly, one per window size and shared by the layers
# that have it. doc_ids[b, t] numbers the documents of row b (0, 1, 2, ... along t); t may attend to s iff s <= t,
# both tokens belong to the same document and, in a layer with a window w, t - s < w: a window never crosses a
# document, since the document mask still applies inside it.

def doc_causal_dense(doc_ids, T, device, window=None):
    """[B, 1, T, T] bool (doc_ids [B, T]) or [T, T] (doc_ids None), True = may attend: the eager and sdpa mask."""
    pos = torch.arange(T, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    if doc_ids is None:
        return allowed
    return (allowed & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


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


def doc_causal_block_mask(doc_ids, B, T, device, window=None):
    """BlockMask for flex_attention: its block sparsity skips the (q, kv) tiles that cross documents or lie
    outside the window."""
    def causal(q, kv):
        return (q >= kv) if window is None else (q >= kv) & (q - kv < window)
    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return causal(q, kv)
        B = None  # one causal mask broadcast over the batch
    else:
        def mask_mod(b, h, q, kv):
            return causal(q, kv) & (doc_ids[b, q] == doc_ids[b, kv])
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


def attended_pairs(cu_seqlens, window=None):
    """Unmasked (query, key) pairs of document-causal attention over a batch: sum over segments of L(L+1)/2, or with
    a window w, of min(t + 1, w) over a segment's positions t; an int64 tensor on cu_seqlens' device (no sync;
    padding slots have L = 0). Transformer.attended_pairs averages it over the layers' windows: divided by B * T^2
    that is the attn_fraction of Transformer.flops_per_token; train.py and the benchmarks count MFU this way."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if window is None:
        return (lengths * (lengths + 1) // 2).sum()
    w = torch.clamp(lengths, max=window)  # the ramp up to the window, then w keys for each later position
    return (w * (w + 1) // 2 + (lengths - w) * w).sum()


def _check_half(q):
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"attn_impl='flash_attention_2' runs in bf16/fp16 only and got {q.dtype}: train with "
                           f"dtype='bfloat16' (autocast), or use attn_impl='flex_attention' or 'sdpa'")


def varlen_kernel():
    """The flash_attention_2 backend's kernel, f(q, k, v [B*T, heads, hd], cu_seqlens, max_len, window) -> [B*T, H, hd]
    (window: None, or the most recent tokens a query sees, itself included: a (window - 1, 0) band):
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
        def flash_attn_kernel(q, k, v, cu_seqlens, max_len, window=None):  # GQA: flash-attn takes fewer k/v heads
            _check_half(q)
            band = (-1, -1) if window is None else (window - 1, 0)  # flash-attn's (-1, -1): no band, causal= applies
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True,
                                          window_size=band)
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
    has_band = "window_size" in params
    native_gqa = "enable_gqa" in params

    def torch_varlen_kernel(q, k, v, cu_seqlens, max_len, window=None):  # torch's Flash Attention 2 kernels
        _check_half(q)
        if window is not None and not has_band:
            raise RuntimeError(f"sliding-window layers (window_pattern) with attn_impl='flash_attention_2' need torch "
                               f">= 2.11 (varlen_attn's window_size; this is torch {torch.__version__}) or the "
                               f"flash-attn package; or use attn_impl='flex_attention'")
        causal = {"window_size": (-1 if window is None else window - 1, 0)} if has_band else {"is_causal": True}
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
        self.prev_embedding = None  # smear: the last token's embedding [B, 1, d_model], for the next step's token

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
    """Multi-head attention with RoPE, optional q/k RMSNorm and grouped-query heads, over the layer's window
    (cfg.layer_windows). With a value embedding (cfg.has_value_embed), v += 3 sigmoid(gate(x[:12])) * E_layer[token]
    per key/value head (ResFormer's value residual, arXiv 2410.17897, in nanochat's per-token form): a token's
    identity reaches the values of later layers directly, for a table lookup's FLOPs. Under deepone's post-norm the
    value path is unchanged otherwise: the embedding enters before the output projection, which DeepNet's beta
    already scales."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.attn_impl, self.layer_idx = cfg.attn_impl, layer_idx
        self.window = cfg.layer_windows()[layer_idx]
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        # Per-head RMSNorm on q and k before RoPE (Qwen3): bounds the attention logits.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.varlen_fn = varlen_kernel() if cfg.attn_impl == "flash_attention_2" else None
        self.value_embed = self.value_gate = None
        if cfg.has_value_embed(layer_idx):
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.n_kv_head * cfg.head_dim)
            # The gate reads the first 12 channels of the input (nanochat's): enough for a per-token scale, and a
            # matrix too small to cost anything.
            self.value_gate = nn.Linear(min(12, cfg.d_model), cfg.n_kv_head, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None, idx=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.value_embed is not None:
            gate = 3 * torch.sigmoid(self.value_gate(x[..., :self.value_gate.in_features]))  # [B, T, kv heads], (0, 3)
            v = v + gate.unsqueeze(-1).type_as(v) * self.value_embed(idx).view_as(v).type_as(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if self.attn_impl == "flash_attention_2" and kv_cache is None:
            cu_seqlens, max_len = mask  # varlen wants [B*T, heads, hd]: the projections' own layout, no transpose
            y = self.varlen_fn(q.reshape(B * T, self.n_head, self.head_dim),
                               k.reshape(B * T, self.n_kv_head, self.head_dim),
                               v.reshape(B * T, self.n_kv_head, self.head_dim), cu_seqlens, max_len, self.window)
            return self.o_proj(y.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if kv_cache is not None:
            # generate(): one sequence per row, no documents. The prefill starts at pos 0, so is_causal is right
            # (its mask is aligned top-left); a one-token step sees the whole cache.
            k, v = kv_cache.update(self.layer_idx, k, v)
            if self.window is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
            else:  # the new queries sit at the cache's last T positions
                end = k.size(2)
                window_mask = doc_causal_dense(None, end, q.device, self.window)[end - T:]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask, enable_gqa=gqa)
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
    """One layer. deepone is post-norm DeepNorm, x = norm(alpha * x + f(x)); llama and qwen3 are pre-norm.
    With x0_mixing the layer's input is first x = resid_scale * x + x0_scale * x0, two learned scalars per layer and
    x0 the normalised first embedding (modded-nanogpt's and nanochat's x0 / residual lambdas): each layer can read
    the token itself again and choose how much of the stream it keeps. Under deepone the blend comes before the
    post-norm residual, so DeepNet's alpha multiplies the blended stream: resid_scale learns around alpha, which
    stays the init's constant."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.post_norm = cfg.family == "deepone"
        self.alpha = deepnet_constants(cfg.n_layer)[0] if self.post_norm else 1.0
        self.window = self.attn.window
        # Shape [1], not 0-d: FSDP2 shards parameters along their first dim
        self.resid_scale = nn.Parameter(torch.ones(1)) if cfg.x0_mixing else None
        self.x0_scale = nn.Parameter(torch.zeros(1)) if cfg.x0_mixing else None
        self.checkpointed = False  # set by Transformer.set_activation_checkpointing

    def forward(self, x, cos, sin, mask, kv_cache=None, x0=None, idx=None):
        """x [B, T, d_model]; x0 (x0_mixing) the normalised first embedding, idx [B, T] (value embeddings) the tokens."""
        if self.checkpointed and torch.is_grad_enabled() and kv_cache is None:
            # Keep only the Block's input; backward recomputes the rest. Inside forward, so that compile_layers
            # traces it and FSDP's hooks on the Block (all-gather, reshard) stay outside the recomputed region.
            return torch.utils.checkpoint.checkpoint(self.layer, x, cos, sin, mask, None, x0, idx, use_reentrant=False)
        return self.layer(x, cos, sin, mask, kv_cache, x0, idx)

    def layer(self, x, cos, sin, mask, kv_cache=None, x0=None, idx=None):
        if self.resid_scale is not None:
            x = self.resid_scale * x + self.x0_scale * x0
        if self.post_norm:
            x = self.attn_norm(self.alpha * x + self.attn(x, cos, sin, mask, kv_cache, idx))
            return self.ffn_norm(self.alpha * x + self.ffn(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, idx)
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
        # smear: x_t += smear_scale sigmoid(smear_gate(x_t[:24])) x_{t-1} (nanochat's), see smear()
        self.smear_gate = nn.Linear(min(24, config.d_model), 1, bias=False) if config.smear else None
        self.smear_scale = nn.Parameter(torch.zeros(1)) if config.smear else None
        # x0_mixing's backout: the head reads x - backout_scale * (the stream after layer n_layer // 2)
        self.backout_scale = nn.Parameter(torch.zeros(1)) if config.x0_mixing else None
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
                v_std = beta * math.sqrt(2 / (cfg.d_model + a.v_proj.out_features))  # xavier_normal's std
            else:
                # GPT-2 practice: N(0, 0.02), with the two projections that write into the residual stream
                # shrunk by 1/sqrt(2N) so the residual's variance does not grow with depth.
                for lin in (a.q_proj, a.k_proj, a.v_proj, *f.inputs()):
                    nn.init.normal_(lin.weight, std=0.02)
                for lin in (a.o_proj, f.down):
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
                v_std = 0.02
            if a.value_embed is not None:
                # The size of v itself for a unit-RMS input (v_proj's std x sqrt(d_model)), as nanochat inits its
                # value embeddings like its value projection; the gate starts just above its midpoint, 1.5.
                nn.init.normal_(a.value_embed.weight, std=v_std * math.sqrt(cfg.d_model))
                nn.init.uniform_(a.value_gate.weight, 0.0, 0.02)
            if block.resid_scale is not None:
                # nanochat's init: more of the stream and of x0 in early layers, less in deep ones
                depth = block.attn.layer_idx / max(cfg.n_layer - 1, 1)
                block.resid_scale.fill_(1.15 - 0.10 * depth)
                block.x0_scale.fill_(0.20 - 0.15 * depth)
        if cfg.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_scale.zero_()  # off at init: the model starts as without smear and learns how much it wants
        if cfg.x0_mixing:
            self.backout_scale.fill_(0.2)  # nanochat's

    def build_masks(self, doc_ids, B, T, device, cu_seqlens=None):
        """The attention masks of one forward, {window: mask} for the layers' windows (None = the whole block). A mask
        is None (sdpa, plain causal), a bool tensor (eager, sdpa), a BlockMask (flex_attention) or (cu_seqlens,
        max_len) (flash_attention_2, whose kernel takes the window from the layer)."""
        impl = self.config.attn_impl
        if impl == "flash_attention_2":
            if cu_seqlens is None:
                cu_seqlens = doc_cu_seqlens(doc_ids, B, T, device)
            # max_len = T bounds every document with no .item() (a sync), and stays fixed batch after batch
            return {window: (cu_seqlens, T) for window in set(self.config.layer_windows())}
        masks = {}
        for window in set(self.config.layer_windows()):
            if impl == "flex_attention":
                masks[window] = doc_causal_block_mask(doc_ids, B, T, device, window)
            elif doc_ids is None and window is None and impl == "sdpa":
                masks[window] = None
            else:
                masks[window] = doc_causal_dense(doc_ids, T, device, window)
        return masks

    def smear(self, x, doc_ids=None, kv_cache=None):
        """x_t + smear_scale sigmoid(smear_gate(x_t[:24])) x_{t-1} for token embeddings x [B, T, d_model] (nanochat's
        smear, after modded-nanogpt): a cheap bigram feature, the previous token's identity mixed in before the first
        layer. Never across documents (doc_ids), and in generation the cache keeps the last token's embedding."""
        prev = x[:, :-1]
        cached = kv_cache is not None and kv_cache.pos > 0 and kv_cache.prev_embedding is not None
        if cached:
            prev = torch.cat((kv_cache.prev_embedding, prev), dim=1)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        current = x if cached else x[:, 1:]
        gate = self.smear_scale * torch.sigmoid(self.smear_gate(current[..., :self.smear_gate.in_features]))
        if doc_ids is not None:
            gate = gate * (doc_ids[:, 1:] == doc_ids[:, :-1]).unsqueeze(-1)
        mixed = current + gate.type_as(x) * prev
        return mixed if cached else torch.cat((x[:, :1], mixed), dim=1)

    def hidden(self, idx, doc_ids=None, cu_seqlens=None, kv_cache=None):
        """Final-norm hidden states [B, T, d_model] of tokens idx: packed documents (doc_ids, cu_seqlens as forward
        takes them), or positions kv_cache.pos onwards of one sequence per row with a KV cache."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        masks = self.build_masks(doc_ids, B, T, idx.device, cu_seqlens) if kv_cache is None else {}
        cos, sin = rope_tables(torch.arange(pos, pos + T, device=idx.device), self.config.head_dim,
                               self.config.rope_theta)
        x = self.tok_emb(idx)
        if self.smear_gate is not None:
            x = self.smear(x, doc_ids, kv_cache)
        x0 = F.rms_norm(x, (x.size(-1),), eps=self.config.norm_eps) if self.config.x0_mixing else None
        backout_layer, x_mid = self.config.n_layer // 2, None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks.get(layer.window), kv_cache, x0, idx)
            if i == backout_layer:
                x_mid = x
        if kv_cache is not None:
            kv_cache.pos += T
        if self.backout_scale is not None and x_mid is not None:
            # Backout (nanochat's): take a learned share of the mid-depth stream out before the head, whose low-level
            # features help the later layers but not the prediction. Under deepone the stream after every layer is
            # post-normed, so the share is of a unit-RMS stream, at any depth.
            x = x - self.backout_scale * x_mid
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
        h = self.hidden(idx, doc_ids, cu_seqlens)
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
        embedding, no value embeddings (lookups too, no matmul) and no output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            n -= sum(block.attn.value_embed.weight.numel() for block in self.layers
                     if block.attn.value_embed is not None)
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def attended_pairs(self, cu_seqlens):
        """attended_pairs of the batch cu_seqlens describes, averaged over the layers' windows (a float tensor, no
        sync): the pairs flops_per_token's attn_fraction counts, times B * T^2."""
        windows = self.config.layer_windows()
        return sum(attended_pairs(cu_seqlens, w) for w in windows) / len(windows)

    def flops_per_token(self, T, attn_fraction=0.5):
        """Training FLOPs (forward + backward) per token at sequence length T, for MFU:
            6 * (body params + vocab * d_model) + 12 * n_layer * d_model * T * attn_fraction
        6 = 2 FLOPs per multiply-add forward + 4 backward (PaLM, arXiv 2204.02311 App. B), over every matmul
        weight, the head included even when tied (the input embedding is a lookup). The second term is QK^T and
        AV over the attended part of the T x T scores: attn_fraction = 0.5 for causal, sum(doc_len^2) / (2 T^2)
        for packed documents if kernels skip the masked blocks (flex, flash), and with sliding-window layers the
        mean over the layers (self.attended_pairs / (B T^2))."""
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
                logits = self.logits(self.hidden(tokens, kv_cache=cache)[:, -1])
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
