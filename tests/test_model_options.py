"""Tests for model.py's per-token options (value_embeds, x0_mixing, smear, sliding-window layers): shapes, parameter
counts and initialisation; every attention backend against eager under each option with packed documents; windows
that never cross a document; the KV cache; activation checkpointing; compile without recompiles; optimizer groups.

    python -m pytest -q tests/test_model_options.py

CPU, tiny sizes. Exact resume, FSDP2 and export with the options on are in test_train.py, test_scale.py and
test_export.py, where train.py and export.py run as users run them.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402
from conftest import packed  # noqa: E402
from data import cu_seqlens_of  # noqa: E402
from model import ModelConfig, Transformer, attended_pairs, doc_causal_dense, rope_tables  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

V = 256
OPTIONS = {
    "value_embeds": dict(value_embeds=True),
    "x0_mixing": dict(x0_mixing=True),
    "smear": dict(smear=True),
    "windows": dict(window_pattern="SSL", short_window=12),
    "all": dict(value_embeds=True, x0_mixing=True, smear=True, window_pattern="SL", short_window=12),
}


def tiny(family="deepone", attn_impl="eager", **overrides):
    """A 3-layer d64 model with GQA 4:2, its option scalars moved off their init (smear starts at 0, the identity,
    which would hide a wrong mask); the same seed gives the same weights under every attn_impl."""
    kw = dict(family=family, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, d_model=64, block_size=128,
              attn_impl=attn_impl)
    kw.update(overrides)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_scale", "value_gate.weight", "smear_gate.weight")):
                p.add_(torch.rand(p.shape) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Shapes, parameter counts, initialisation

@pytest.mark.parametrize("family", ["deepone", "llama"])
def test_value_embeds_shapes_count_and_init(family):
    plain = Transformer(ModelConfig(family=family, vocab_size=4096, n_layer=5, n_head=8, n_kv_head=2, d_model=256))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family=family, vocab_size=4096, n_layer=5, n_head=8, n_kv_head=2, d_model=256,
                                    value_embeds=True))
    kv_dim = 2 * 32
    with_embed = [i for i, layer in enumerate(model.layers) if layer.attn.value_embed is not None]
    assert with_embed == [0, 2, 4]  # every other layer, counted back from the last
    assert model.num_params() - plain.num_params() == 3 * (4096 * kv_dim + 2 * 12)
    # the value embeddings are lookups: MFU's FLOPs count only their gates' matmuls
    assert model.num_params(non_embedding=True) - plain.num_params(non_embedding=True) == 3 * 2 * 12
    assert model.flops_per_token(256) - plain.flops_per_token(256) == 6 * 3 * 2 * 12
    assert all(model.layers[i].attn.value_gate is None for i in (1, 3))
    v_proj = model.layers[0].attn.v_proj.weight
    for i in with_embed:
        attn = model.layers[i].attn
        assert attn.value_embed.weight.shape == (4096, kv_dim) and attn.value_gate.weight.shape == (2, 12)
        # the size of v itself: v_proj's std times sqrt(d_model), for unit-RMS inputs
        assert attn.value_embed.weight.std().item() == pytest.approx(v_proj.std().item() * math.sqrt(256), rel=0.05)
        assert 0 <= attn.value_gate.weight.min() and attn.value_gate.weight.max() <= 0.02


def test_x0_mixing_and_smear_shapes_count_and_init():
    cfg = dict(vocab_size=V, n_layer=5, n_head=4, d_model=64)
    plain = Transformer(ModelConfig(**cfg))
    mixed = Transformer(ModelConfig(**cfg, x0_mixing=True))
    smeared = Transformer(ModelConfig(**cfg, smear=True))
    assert mixed.num_params() - plain.num_params() == 2 * 5 + 1  # two scalars a layer, and the backout
    assert smeared.num_params() - plain.num_params() == 24 + 1  # the gate reads 24 channels, and the scale
    assert [round(b.resid_scale.item(), 4) for b in mixed.layers] == [1.15, 1.125, 1.1, 1.075, 1.05]
    assert [round(b.x0_scale.item(), 4) for b in mixed.layers] == [0.2, 0.1625, 0.125, 0.0875, 0.05]
    assert mixed.backout_scale.item() == pytest.approx(0.2) and mixed.layers[0].resid_scale.shape == (1,)
    assert smeared.smear_scale.item() == 0 and smeared.smear_gate.weight.shape == (1, 24)
    assert 0 <= smeared.smear_gate.weight.min() and smeared.smear_gate.weight.max() <= 0.02


def test_smear_starts_as_the_identity():
    """smear_scale 0 at init: the same weights give the same logits with and without smear."""
    idx, doc = packed(T=128)
    plain = Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, block_size=128))
    smeared = Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, block_size=128, smear=True))
    missing, unexpected = smeared.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["smear_gate.weight", "smear_scale"] and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(smeared(idx, doc_ids=doc)[0], plain(idx, doc_ids=doc)[0], atol=0, rtol=0)


def test_window_pattern_and_short_window():
    six = ModelConfig(n_layer=6, block_size=4096, window_pattern="SSSL")
    assert six.short_window == 1024  # block_size / 4, a multiple of 128
    assert six.layer_windows() == [1024, 1024, 1024, None, 1024, None]  # tiled; the last layer is always whole
    assert ModelConfig(block_size=256).short_window == 128
    assert ModelConfig(block_size=300).short_window == 128  # 75 rounded up to flex's 128-token tile
    assert ModelConfig(block_size=64).short_window == 64
    assert ModelConfig(n_layer=3, block_size=64, window_pattern="S").layer_windows() == [None] * 3  # window = block
    assert ModelConfig(n_layer=3, window_pattern="S", short_window=7).layer_windows() == [7, 7, None]
    for pattern in ("", "SXL", "ssl"):
        with pytest.raises(ValueError, match=f"window_pattern={pattern!r}: a string of L"):
            ModelConfig(window_pattern=pattern)
    with pytest.raises(ValueError, match="short_window=0: the tokens an S layer attends to, >= 1"):
        ModelConfig(short_window=0)


def test_attended_pairs_counts_windowed_attention():
    """attended_pairs with a window equals a count of the mask's True entries; the model's averages its layers."""
    _, doc = packed(T=128)
    cu = torch.from_numpy(cu_seqlens_of(doc.numpy()))
    for window in (None, 1, 12, 50, 500):
        assert attended_pairs(cu, window).item() == doc_causal_dense(doc, 128, "cpu", window).sum().item()
    model = tiny(**OPTIONS["windows"])  # windows 12, 12, whole
    want = (2 * doc_causal_dense(doc, 128, "cpu", 12).sum() + doc_causal_dense(doc, 128, "cpu").sum()) / 3
    assert model.attended_pairs(cu).item() == pytest.approx(want.item())


# ---------------------------------------------------------------------------------------------------------------
# Backends, documents, windows

@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("family", ["deepone", "llama"])
def test_backends_match_eager_under_each_option(option, family):
    idx, doc = packed(T=128)
    ref = tiny(family, "eager", **OPTIONS[option])
    with torch.no_grad():
        for impl in ("sdpa", "flex_attention"):
            model = tiny(family, impl, **OPTIONS[option])
            for d in (doc, None):
                torch.testing.assert_close(model(idx, doc_ids=d)[0], ref(idx, doc_ids=d)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_sdpa_backward_matches_eager_under_each_option(option):
    idx, doc = packed(T=64)
    targets = idx.roll(-1, dims=1)
    grads = []
    for impl in ("eager", "sdpa"):
        model = tiny("deepone", impl, **OPTIONS[option])
        model(idx, targets, doc_ids=doc)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert set(grads[0]) == set(grads[1]) and all(g is not None for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa", "flex_attention"])
def test_documents_stay_isolated_under_each_option(option, attn_impl):
    """Changing one document's tokens leaves every other document's logits unchanged: no window, smear or value
    embedding carries anything across a document boundary."""
    idx, doc = packed(T=128)
    model = tiny("deepone", attn_impl, **OPTIONS[option])
    in_doc = doc[0] == 1  # row 0, tokens 25..63: a document with others on both sides
    perturbed = idx.clone()
    perturbed[0, in_doc] = (idx[0, in_doc] + 1) % V
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc)[0], model(perturbed, doc_ids=doc)[0]
    torch.testing.assert_close(b[0, ~in_doc], a[0, ~in_doc], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=0)
    assert (b[0, in_doc] - a[0, in_doc]).abs().max() > 1e-3


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa", "flex_attention"])
def test_a_window_layer_sees_exactly_its_last_tokens(attn_impl):
    """One windowed attention layer: changing the input at position p changes the outputs at p .. p + w - 1 of its
    document, and none elsewhere."""
    w = 12
    model = tiny("llama", attn_impl, window_pattern="S", short_window=w)
    attn = model.layers[0].attn
    assert attn.window == w
    _, doc = packed(T=128)
    x = torch.randn(2, 128, 64)
    cos, sin = rope_tables(torch.arange(128), 16, 10000.0)
    masks = model.build_masks(doc, 2, 128, x.device)
    for p in (5, 30, 70):  # row 0: document 1 spans 25..63, so 30 + 12 stays inside it
        y = x.clone()
        y[:, p] += 1.0
        with torch.no_grad():
            changed = (attn(y, cos, sin, masks[w]) - attn(x, cos, sin, masks[w])).abs().amax(-1)[0] > 1e-6
        reach = torch.zeros(128, dtype=torch.bool)
        reach[p:p + w] = True
        assert torch.equal(changed, reach & (doc[0] == doc[0, p])), p


def _varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """torch 2.12's varlen_attn signature, computed with eager attention over each segment on the CPU."""
    left, right = window_size
    assert right == 0 and left >= -1
    out = torch.empty_like(query)
    rep = query.size(1) // key.size(1)
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        if b > a:
            q, k, v = (t[a:b].transpose(0, 1).float() for t in (query, key.repeat_interleave(rep, 1),
                                                               value.repeat_interleave(rep, 1)))
            mask = doc_causal_dense(None, b - a, "cpu", None if left < 0 else left + 1)
            out[a:b] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).to(query.dtype)
    return out


def test_flash_attention_2_passes_each_layer_its_window(monkeypatch):
    """flash_attention_2 hands each layer's window to the varlen kernel as a (window - 1, 0) band: the same loss as
    sdpa's with the options on; torch 2.10's varlen (no window_size) is refused by name."""
    import torch.nn.attention.varlen as varlen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(varlen, "varlen_attn", _varlen_stand_in)
    idx, doc = packed(T=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, want = tiny("llama", "sdpa", **OPTIONS["all"])(idx, idx, doc_ids=doc)
        _, got = tiny("llama", "flash_attention_2", **OPTIONS["all"])(idx, idx, doc_ids=doc)
    assert torch.allclose(got, want, rtol=2e-3), (got, want)

    def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        raise AssertionError("not reached")
    monkeypatch.setattr(varlen, "varlen_attn", varlen_2_10)
    with pytest.raises(RuntimeError, match=r"sliding-window layers .* need torch >= 2.11"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tiny("llama", "flash_attention_2", **OPTIONS["windows"])(idx, idx, doc_ids=doc)


# ---------------------------------------------------------------------------------------------------------------
# Generation, checkpointing, compile, optimizer groups

@pytest.mark.parametrize("option", list(OPTIONS))
def test_generate_kv_cache_matches_the_full_forward(option):
    """block_size 16, short windows of 5 (12 for 'all'): 5 + 20 tokens, so the cache also re-reads its window."""
    options = {**OPTIONS[option], "short_window": 5} if option == "windows" else OPTIONS[option]
    model = tiny("deepone", "sdpa", block_size=16, **options)
    prompt = torch.randint(0, V, (2, 5))
    greedy = model.generate(prompt, 20, top_k=1)
    assert torch.equal(greedy, model.generate(prompt, 20, top_k=1, use_kv_cache=False))
    torch.manual_seed(1)
    sampled = model.generate(prompt, 20, temperature=2.0)
    torch.manual_seed(1)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=2.0, use_kv_cache=False))


def test_activation_checkpointing_with_the_options_gives_the_same_gradients():
    idx, doc = packed(T=64)
    model = tiny("deepone", "sdpa", **OPTIONS["all"])
    results = []
    for policy in ("none", "all"):
        model.zero_grad(set_to_none=True)
        loss = model.set_activation_checkpointing(policy)(idx, idx, doc_ids=doc)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_compile_with_the_options_needs_no_recompile_across_batches():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ref = tiny("deepone", "sdpa", **OPTIONS["all"])
    model = tiny("deepone", "sdpa", **OPTIONS["all"]).compile_layers()
    try:
        for step in range(4):
            idx, doc = packed(T=64, seed=step)
            cu_seqlens = torch.from_numpy(cu_seqlens_of(doc.numpy()))
            torch._dynamo.config.error_on_recompile = step > 0
            _, loss = model(idx, idx, doc, cu_seqlens)
            loss.backward()
            torch.testing.assert_close(loss, ref(idx, idx, doc_ids=doc)[1], atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert not counters["graph_break"]


def test_optimizer_groups_of_the_new_parameters():
    """Under Muon: the value embeddings go to AdamW with the token embedding (decayed like it), their gates are
    matrices for Muon, the scalars go to AdamW undecayed; smear's gate (outside the Blocks) goes to AdamW."""
    model = tiny("deepone", "sdpa", **OPTIONS["all"])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {label: {names[id(p)] for p in g["params"]} for label, g in optim.param_groups(model, 0.1, muon=True)}
    assert "layers.0.attn.value_embed.weight" in groups["adamw, decayed"]
    assert "smear_gate.weight" in groups["adamw, decayed"]
    assert "layers.0.attn.value_gate.weight" in groups["muon"]
    assert {"layers.1.resid_scale", "layers.1.x0_scale", "backout_scale", "smear_scale"} <= groups["adamw, not decayed"]
    assert not any("value_embed" in n for n in groups["muon"])
    assert sum(map(len, groups.values())) == len(names)
