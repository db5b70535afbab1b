"""Tests for model.py: backends agree and keep documents apart, causality, DeepNet constants and init, preset sizes,
the lean head + loss, KV-cache generation, config errors, and one torch.compile check.

    python -m pytest -q tests/test_model.py

CPU, tiny sizes. flex_attention is checked forward-only on CPU (torch has no CPU backward for it); its backward
is checked only where a GPU is present.
"""
import dataclasses
import math
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import optim  # noqa: E402
from conftest import cuda_only, packed  # noqa: E402
from data import cu_seqlens_of  # noqa: E402
from model import (ModelConfig, Transformer, LinearCrossEntropy, deepnet_constants, doc_cu_seqlens,  # noqa: E402
                   doc_causal_block_mask)
from machine import gpu_peak_tflops  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FAMILIES = ["deepone", "llama", "qwen3"]
CPU_IMPLS = ["eager", "sdpa", "flex_attention"]
V = 256


def tiny(family="deepone", attn_impl="sdpa", **overrides):
    """A 2-layer d64 model with GQA 4:2; the same seed gives the same weights under every attn_impl."""
    kw = dict(family=family, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=256,
              attn_impl=attn_impl)
    kw.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**kw))


# ---------------------------------------------------------------------------------------------------------------
# Attention backends

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "flex_attention"])
def test_forward_matches_eager(family, attn_impl):
    idx, doc = packed()
    ref, model = tiny(family, "eager"), tiny(family, attn_impl)
    with torch.no_grad():
        for d in (doc, None):
            want, _ = ref(idx, doc_ids=d)
            got, _ = model(idx, doc_ids=d)
            assert got.shape == (2, 256, V) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_sdpa_matches_eager(family):
    idx, doc = packed(T=128)
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    ref, model = tiny(family, "eager"), tiny(family, "sdpa")
    losses = []
    for m in (ref, model):
        logits, loss = m(idx, targets, doc_ids=doc)
        assert logits is None
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn_impl", CPU_IMPLS)
def test_documents_are_isolated(attn_impl):
    """Changing one document's tokens leaves every other document's logits unchanged, before and after it."""
    idx, doc = packed()
    model = tiny("deepone", attn_impl)
    perturbed = idx.clone()
    in_doc = doc[0] == 1  # row 0, tokens 50..127
    perturbed[0, in_doc] = (idx[0, in_doc] + 1) % V
    with torch.no_grad():
        a, _ = model(idx, doc_ids=doc)
        b, _ = model(perturbed, doc_ids=doc)
    torch.testing.assert_close(b[0, ~in_doc], a[0, ~in_doc], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=0)
    assert (b[0, in_doc] - a[0, in_doc]).abs().max() > 1e-3


@pytest.mark.parametrize("attn_impl", CPU_IMPLS)
def test_causal(attn_impl):
    idx, _ = packed(T=128)
    model = tiny("qwen3", attn_impl)
    perturbed = idx.clone()
    perturbed[:, 70:] = (idx[:, 70:] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(perturbed)
    torch.testing.assert_close(b[:, :70], a[:, :70], atol=1e-6, rtol=0)
    assert (b[:, 70:] - a[:, 70:]).abs().max() > 1e-3


def test_block_mask_skips_cross_document_blocks():
    _, doc = packed()
    bm = doc_causal_block_mask(doc, 2, 256, torch.device("cpu"))
    # Blocks of 128: in row 0 (documents 0-49, 50-127, 128-199, 200-255) query block 1 may only see kv block 1;
    # the causal-only mask would also visit kv block 0.
    visited = bm.kv_num_blocks + (bm.full_kv_num_blocks if bm.full_kv_num_blocks is not None else 0)
    assert visited[0, 0].tolist() == [1, 1]
    causal = doc_causal_block_mask(None, 2, 256, torch.device("cpu"))
    visited = causal.kv_num_blocks + causal.full_kv_num_blocks
    assert visited[0, 0].tolist() == [1, 2]


def test_cu_seqlens_for_flash():
    doc = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    assert doc_cu_seqlens(doc, 2, 5, doc.device).tolist() == [0, 2, 5, 6, 8, 10]
    assert doc_cu_seqlens(None, 2, 5, doc.device).tolist() == [0, 5, 10]
    assert doc_cu_seqlens(doc, 2, 5, doc.device).dtype == torch.int32


def test_flex_training_on_cpu_is_refused():
    idx, doc = packed(T=64)
    model = tiny("deepone", "flex_attention")
    with pytest.raises(RuntimeError, match="attn_impl='sdpa'"):
        model(idx, idx, doc_ids=doc)


@cuda_only("flex_attention's backward runs only on GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_backward_matches_eager_on_gpu(family):
    idx, doc = packed()
    idx, doc = idx.cuda(), doc.cuda()
    ref, model = tiny(family, "eager").cuda(), tiny(family, "flex_attention").cuda()
    for m in (ref, model):
        m(idx, idx, doc_ids=doc)[1].backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# DeepNet

def test_deepnet_constants_and_init():
    n = 6
    alpha, beta = deepnet_constants(n)
    assert alpha == pytest.approx((2 * n) ** 0.25) and beta == pytest.approx((8 * n) ** -0.25)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layer=n, n_head=4, d_model=256))
    xavier = lambda w, gain: gain * math.sqrt(2.0 / sum(w.shape))  # noqa: E731
    for block in model.layers:
        assert block.post_norm and block.alpha == pytest.approx(alpha)
        a, f = block.attn, block.ffn
        for lin, gain in [(a.q_proj, 1.0), (a.k_proj, 1.0), (a.v_proj, beta), (a.o_proj, beta),
                          (f.gate, beta), (f.up, beta), (f.down, beta)]:
            w = lin.weight
            assert w.mean().abs() < 0.01 * w.std()
            assert w.std().item() == pytest.approx(xavier(w, gain), rel=0.03)
    # The layer really is x = norm(alpha * x + f(x)) for attention and the FFN.
    block, x = model.layers[0], torch.randn(2, 16, 256)
    cos, sin = torch.ones(16, 32), torch.zeros(16, 32)  # position 0 everywhere: RoPE is the identity
    with torch.no_grad():
        h = block.attn_norm(alpha * x + block.attn(x, cos, sin, None))
        want = block.ffn_norm(alpha * h + block.ffn(h))
        torch.testing.assert_close(block(x, cos, sin, None), want)


def test_prenorm_families_init():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=V, n_layer=4, n_head=4, d_model=256))
    for block in model.layers:
        assert not block.post_norm and block.alpha == 1.0
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert block.ffn.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.03)


# ---------------------------------------------------------------------------------------------------------------
# Presets

def load_preset(name):
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in runpy.run_path(os.path.join(ROOT, "config", f"{name}.py")).items() if k in fields}


@pytest.mark.parametrize("name, total, body", [
    ("deepone", 125_355_136, 60_966_016),
    ("qwen3_138m", 137_752_320, 99_118_848),
    ("llama_52m", 51_980_800, 26_225_152),
    ("smollm2_135m", 135_178_560, 106_203_456),
    ("smoke", 13_304_576, 426_752),
])
def test_preset_param_counts(name, total, body):
    with torch.device("meta"):
        model = Transformer(ModelConfig(**load_preset(name)))
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == body


def test_preset_shapes():
    deepone = ModelConfig(**load_preset("deepone"))
    assert deepone.family == "deepone" and not deepone.tie_embeddings and deepone.qk_norm
    with torch.device("meta"):  # the size of the model the preset builds, not a number copied from above
        assert 117e6 <= Transformer(deepone).num_params() <= 135e6  # GPT-2 small's scale (124M)
    qwen3 = ModelConfig(**load_preset("qwen3_138m"))
    assert (qwen3.d_model, qwen3.n_layer, qwen3.n_head, qwen3.n_kv_head, qwen3.d_ff) == (768, 16, 8, 2, 2048)
    assert qwen3.tie_embeddings and qwen3.qk_norm and qwen3.rope_theta == 1e6
    llama = ModelConfig(**load_preset("llama_52m"))
    assert (llama.d_model, llama.n_layer, llama.n_head, llama.n_kv_head, llama.d_ff) == (512, 10, 8, 2, 1280)
    assert llama.tie_embeddings and not llama.qk_norm
    smollm2 = ModelConfig(**load_preset("smollm2_135m"))
    assert (smollm2.family, smollm2.d_model, smollm2.n_layer, smollm2.n_head, smollm2.n_kv_head, smollm2.d_ff,
            smollm2.block_size) == ("llama", 576, 30, 9, 3, 1536, 2048)
    assert smollm2.tie_embeddings and not smollm2.qk_norm and smollm2.norm_eps == 1e-5
    with torch.device("meta"):  # with SmolLM's 49,152-token vocabulary: SmolLM2-135M's 134,515,008 parameters
        assert Transformer(dataclasses.replace(smollm2, vocab_size=49152)).num_params() == 134_515_008


def test_smoke_model_memorizes_a_batch():
    """The smoke preset's model (vocab cut to 512 for speed) drives the loss on one repeated batch far below
    ln(vocab) = 6.24."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**load_preset("smoke"), "vocab_size": 512, "block_size": 64}))
    opt = optim.make_optimizer(model, "adamw", "float32", 3e-3, (0.9, 0.95), 0.1, 0, "cpu")
    seq = torch.randint(0, 512, (4, 65))
    x, y = seq[:, :-1], seq[:, 1:]
    doc = torch.zeros(4, 64, dtype=torch.long)
    doc[:, 40:] = 1
    for _ in range(100):
        _, loss = model(x, y, doc_ids=doc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * math.log(512)


@pytest.mark.parametrize("family", FAMILIES)
def test_relu2_feed_forward_shapes_init_and_output(family):
    """ffn='relu2': two matrices (up, down) of d_ff = 4 d_model by default, the parameters of the GLU's three at
    8/3 d_model; down(relu(up x)^2); initialised as the GLU's matrices are (deepone: xavier with DeepNet's beta;
    llama, qwen3: N(0, 0.02), down shrunk by 1/sqrt(2N)); both matrices go to Muon."""
    model = tiny(family, ffn="relu2")
    ffn = model.layers[0].ffn
    assert ffn.gate is None and ffn.up.weight.shape == (256, 64) and ffn.down.weight.shape == (64, 256)
    assert model.config.d_ff == 4 * 64 and tiny(family, ffn="relu2", d_ff=96).config.d_ff == 96
    assert sum(p.numel() for p in ffn.parameters()) == 2 * 64 * 256
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(ffn(x), F.relu(x @ ffn.up.weight.T).square() @ ffn.down.weight.T)
    if family == "deepone":
        beta = deepnet_constants(2)[1]
        for lin in (ffn.up, ffn.down):  # xavier_normal: std = gain sqrt(2 / (fan_in + fan_out))
            assert lin.weight.std().item() == pytest.approx(beta * math.sqrt(2 / (64 + 256)), rel=0.05)
    else:
        assert ffn.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert ffn.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    groups = {name: g for name, g in optim.param_groups(model, 0.0, muon=True)}
    muon = [p for g in groups.values() if g["muon"] for p in g["params"]]
    assert any(p is ffn.up.weight for p in muon) and any(p is ffn.down.weight for p in muon)
    with pytest.raises(ValueError, match="ffn='swiglu' is unknown; choose one of glu, relu2"):
        ModelConfig(ffn="swiglu")


# ---------------------------------------------------------------------------------------------------------------
# Lean head + loss

@pytest.mark.parametrize("chunk_size, softcap", [(7, 0.0), (16, 0.0), (1000, 0.0), (7, 3.0), (1000, 3.0)])
def test_lean_loss_matches_plain_cross_entropy(chunk_size, softcap):
    """Value and gradients of the chunked loss equal plain cross-entropy's, with logits capped to c tanh(z / c)
    when softcap c > 0 (3 here, below most of these logits' size: the cap binds); each row's loss too (evaluation)."""
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(V, 32, requires_grad=True)
    targets = torch.randint(0, V, (50,))
    targets[::4] = -100
    logits = F.linear(h, w).float()
    if softcap:
        assert (logits.abs() > softcap).float().mean() > 0.5
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits, targets, ignore_index=-100)
    want_gh, want_gw = torch.autograd.grad(want * 0.5, (h, w))  # a scaled loss, as with grad accumulation
    got = LinearCrossEntropy(chunk_size, softcap)(h, w, targets)
    got_gh, got_gw = torch.autograd.grad(got * 0.5, (h, w))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_gh, want_gh)
    torch.testing.assert_close(got_gw, want_gw)
    with torch.no_grad():
        torch.testing.assert_close(LinearCrossEntropy(chunk_size, softcap)(h, w, targets), want)
        rows = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        torch.testing.assert_close(LinearCrossEntropy(chunk_size, softcap)(h, w, targets, per_row=True), rows)


def test_lean_loss_under_autocast_casts_the_head_weight_once():
    """bf16 autocast (CPU emulates it): the loss and gradients match plain cross-entropy under the same autocast
    to bf16 rounding, and the head weight is cast to bf16 once per forward, not once per chunk. The autocast cast
    cache is off, as it is in compiled code, where per-chunk casts were a whole-matrix kernel each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == (V, 32):
                self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(V, 32, requires_grad=True)
    targets = torch.randint(0, V, (50,))
    targets[::4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        want = F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-100)
        want_gh, want_gw = torch.autograd.grad(want, (h, w))
        with CountWeightCasts() as casts:
            got = LinearCrossEntropy(7)(h, w, targets)  # 8 chunks
        got_gh, got_gw = torch.autograd.grad(got, (h, w))
    assert casts.n == 1
    assert got.dtype == torch.float32 and got_gh.dtype == got_gw.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_gh, want_gh, atol=1e-6, rtol=0)  # the same bf16 matmuls
    # the plain loss sums all 50 rows in one bf16 matmul; the lean one per chunk, in fp32: within bf16 rounding
    torch.testing.assert_close(got_gw, want_gw, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("family, tied, softcap", [("llama", True, 0.0), ("deepone", False, 0.0),
                                                   ("deepone", False, 0.3)])
def test_model_loss_matches_logits_path(family, tied, softcap):
    """The chunked loss of forward(idx, targets) equals cross-entropy on forward(idx)'s logits, in value and in
    every gradient, the tied embedding/head matrix included, and with logit_softcap (0.3: it binds on the largest
    logits of a freshly initialised model, up to about 0.55) on both paths."""
    idx, doc = packed(T=64)
    targets = idx.roll(-1, dims=1)
    targets[:, ::5] = -100
    lean, plain = (tiny(family, tie_embeddings=tied, loss_chunk_size=24, logit_softcap=softcap) for _ in range(2))
    if softcap:
        logits = plain.lm_head(plain.hidden(idx, doc)).float()
        assert logits.abs().max() > 1.5 * softcap and plain(idx, doc_ids=doc)[0].abs().max() <= softcap
    assert (lean.lm_head.weight is lean.tok_emb.weight) == tied
    _, loss = lean(idx, targets, doc_ids=doc)
    logits, _ = plain(idx, doc_ids=doc)
    want = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), p_plain in zip(lean.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p_plain.grad, atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Generation, utilities, errors

@pytest.mark.parametrize("family, options", [*((f, {}) for f in FAMILIES), ("deepone", {"logit_softcap": 0.3}),
                                             ("deepone", {"ffn": "relu2"})])
def test_generate_kv_cache_matches_no_cache(family, options):
    model = tiny(family, block_size=16, **options)  # 5 + 20 tokens: the window slides past block_size
    prompt = torch.randint(0, V, (2, 5))
    greedy = model.generate(prompt, 20, top_k=1)
    assert greedy.shape == (2, 25) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 20, top_k=1, use_kv_cache=False))
    torch.manual_seed(1)
    sampled = model.generate(prompt, 20, temperature=0.8, top_k=50)
    torch.manual_seed(1)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=0.8, top_k=50, use_kv_cache=False))


def test_num_params_flops_and_optimizer():
    model = tiny("qwen3", tie_embeddings=True)
    cfg = model.config
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(non_embedding=True) == model.num_params() - V * 64
    want = 6 * (model.num_params(non_embedding=True) + V * 64) + 12 * cfg.n_layer * 64 * 256 * 0.5
    assert model.flops_per_token(256) == want
    opt = optim.make_optimizer(model, "adamw", "float32", 1e-3, (0.9, 0.95), 0.1, 0, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(unique)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=100, n_head=3), r"d_model=100 is not divisible by n_head=3"),
    (dict(n_head=12, n_kv_head=5), r"n_head=12 is not divisible by n_kv_head=5"),
    (dict(family="gpt2"), r"family='gpt2' is unknown; choose one of deepone, llama, qwen3"),
    (dict(attn_impl="flash"), r"attn_impl='flash' is unknown; choose one of eager, sdpa, flex_attention, "
                              r"flash_attention_2"),
    (dict(d_model=60, n_head=4), r"head dim .* = 15 is odd"),
    (dict(n_layer=0), r"n_layer=0: model sizes must be >= 1"),
    (dict(n_head=0), r"n_head=0: model sizes must be >= 1"),
    (dict(d_model=0), r"d_model=0: model sizes must be >= 1"),
    (dict(n_kv_head=0, d_ff=-1), r"n_kv_head=0, d_ff=-1: model sizes must be >= 1"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_defaults():
    assert ModelConfig().n_kv_head == 12 and ModelConfig().d_ff == 2048
    assert ModelConfig(family="deepone").qk_norm and ModelConfig(family="qwen3").qk_norm
    assert not ModelConfig(family="llama").qk_norm
    with pytest.raises(ValueError, match="block_size=32"):
        tiny(block_size=32)(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where flash-attn cannot run")
def test_flash_attention_2_without_cuda_is_a_clear_error():
    with pytest.raises((RuntimeError, ImportError), match="flash_attention_2.*sdpa"):
        tiny(attn_impl="flash_attention_2")


def _varlen_reference(q, k, v, cu_seq, causal, gqa):
    """Document-causal attention over [N, heads, hd] segments, computed with SDPA on the CPU."""
    if k.size(1) != q.size(1) and not gqa:
        raise RuntimeError("varlen_attn: k/v have fewer heads than q")  # as the releases without enable_gqa
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for a, b in zip(cu_seq[:-1].tolist(), cu_seq[1:].tolist()):
        if b > a:
            seg = [t[a:b].transpose(0, 1).float() for t in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=causal).transpose(0, 1).to(q.dtype)
    return out


# Stand-ins with the keyword-only parameters of each published torch.nn.attention.varlen.varlen_attn: an unknown
# keyword is a TypeError, as with the real function.
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    return _varlen_reference(query, key, value, cu_seq_q, is_causal, gqa=False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    assert tuple(window_size) in ((-1, -1), (-1, 0))
    return _varlen_reference(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), gqa=False)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    assert tuple(window_size) in ((-1, -1), (-1, 0))
    return _varlen_reference(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), gqa=enable_gqa)


@pytest.mark.parametrize("stand_in", [varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_12])
def test_flash_attention_2_calls_each_published_varlen_signature(monkeypatch, stand_in):
    """Without flash-attn, flash_attention_2 runs torch's varlen_attn, whose keywords differ by release: each
    release's signature gets a call it accepts, with GQA (4 query : 2 kv heads), and sdpa's losses."""
    import torch.nn.attention.varlen as varlen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the kernel is chosen for a GPU
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    idx, doc = packed()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel takes bf16 only
        _, ref = tiny("llama", "sdpa")(idx, idx, doc_ids=doc)
        _, loss = tiny("llama", "flash_attention_2")(idx, idx, doc_ids=doc)
    assert torch.allclose(loss, ref, rtol=2e-3), (loss, ref)


def test_compile_layers_no_recompiles_across_batches():
    """compile_layers: same losses as eager, unprefixed state_dict, no graph breaks, and new doc_ids in later
    steps reuse the compiled graphs (a recompile raises)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ref = tiny("deepone", "sdpa", n_layer=2, loss_chunk_size=100)
    model = tiny("deepone", "sdpa", n_layer=2, loss_chunk_size=100).compile_layers()
    assert not any("_orig_mod" in k for k in model.state_dict())
    try:
        for step in range(5):
            idx, doc = packed(T=64, seed=step)
            cu_seqlens = torch.from_numpy(cu_seqlens_of(doc.numpy()))  # as the loader ships it: a fixed shape
            torch._dynamo.config.error_on_recompile = step > 0
            _, loss = model(idx, idx, doc, cu_seqlens)
            loss.backward()
            _, want = ref(idx, idx, doc_ids=doc)
            torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert not counters["graph_break"]
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_gpu_peak_matches_whole_names(device_name, tflops):
    """Real torch.cuda.get_device_name() strings: "L4" must not match "NVIDIA L40", nor "A10" an A100."""
    assert gpu_peak_tflops(device_name) == tflops


def test_float8_is_refused_with_what_it_lacks(monkeypatch):
    """float8=True on a machine without FP8 tensor cores, or without torchao: one message naming each lack and the
    way out (train.py --dry_run=True on this CPU: exit 1, no traceback)."""
    import subprocess
    from conftest import ROOT
    import machine
    proc = subprocess.run([sys.executable, "train.py", "config/smoke.py", "--device=cpu", "--float8=True",
                           "--dry_run=True"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "float8=True needs torchao and a GPU of compute capability 8.9" in proc.stdout + proc.stderr
    assert "the device is cpu" in proc.stdout + proc.stderr and "--float8=False" in proc.stdout + proc.stderr
    real_find_spec = machine.importlib.util.find_spec
    monkeypatch.setattr(machine.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"torchao is not installed \(pip install torchao\); and the device is cpu"):
        machine.check_float8("cpu")


def test_float8_swaps_the_blocks_linears_and_keeps_the_weights():
    """use_float8_matmuls: every Block linear becomes torchao's Float8Linear (its sizes are multiples of 16), the
    head and embedding stay, the state_dict keeps its keys and tensors (checkpoints and exports unchanged); forward
    and backward run (on this CPU through torch's scaled matmul) near the bf16 model's loss and gradients."""
    pytest.importorskip("torchao", reason="torchao is the optional extra of float8=True (pip install torchao)")
    from torchao.float8.float8_linear import Float8Linear
    torch.manual_seed(0)
    cfg = ModelConfig(family="deepone", vocab_size=V, n_layer=2, n_head=2, d_model=64, d_ff=128, block_size=64,
                      attn_impl="sdpa")
    plain, fp8 = Transformer(cfg), Transformer(cfg)
    fp8.load_state_dict(plain.state_dict())
    fp8.use_float8_matmuls()
    linears = [m for m in fp8.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Float8Linear) for m in linears)
    assert not isinstance(fp8.lm_head, Float8Linear)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fp8.state_dict().values()))
    assert list(plain.state_dict()) == list(fp8.state_dict())
    x, y = torch.randint(0, V, (2, 64)), torch.randint(0, V, (2, 64))
    losses = []
    for model in (plain, fp8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    errors = {name: ((a.grad - b.grad).norm() / a.grad.norm()).item()
              for (name, a), b in zip(plain.named_parameters(), fp8.parameters())}
    # e5m2 gradients keep 2 mantissa bits (up to 12.5% per element): measured at most 17% of a weight's gradient
    # norm here, 2% for the embedding and gains, which stay out of FP8
    assert max(errors.values()) < 0.25 and errors["tok_emb.weight"] < 0.05, errors
