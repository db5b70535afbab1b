"""GPU speed: the flash_attention_2 backend's plumbing, honest MFU (train.py and bench.py
count the same FLOPs for the same batch), bench.py --what=profile, compile_mode, and the GPU-only checks.

    python -m pytest -q tests/test_speed.py

On CPU: tiny models, real train.py/bench.py processes with --device=cpu. The varlen kernels (flash-attn and
torch.nn.attention.varlen) are CUDA-only: on CPU one test drives the backend's own code (layouts, the loader's
padded cu_seqlens, GQA) through a reference kernel written here, and the tests marked GPU compare the real
kernels where CUDA exists (skipped elsewhere, with the reason).
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tools import bench
import model as model_module
from conftest import ROOT, cuda_only
from data import PackedLoader, cu_seqlens_of
from model import ModelConfig, Transformer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
NO_CUDA = "the varlen/flex kernels under test and train.py on a GPU need CUDA; this machine has none"
V = 256
TINY = ["--n_layer=2", "--n_head=2", "--d_model=32", "--block_size=64", "--batch_size=2", "--compile=False",
        "--dtype=float32", "--peak_tflops=1.0"]


def tiny(attn_impl, family="qwen3", **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(family=family, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                   block_size=128, attn_impl=attn_impl, **kw))


def packed_batch(B=2, T=128, seed=0):
    """Tokens, doc_ids and the loader's padded cu_seqlens of rows packed with documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    doc = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for c in (torch.randperm(T - 1, generator=g)[:3 + b] + 1).tolist():
            doc[b, c:] += 1
    return idx, doc, torch.from_numpy(cu_seqlens_of(doc.numpy()))


def reference_varlen(q, k, v, cu_seqlens, max_len, window=None):
    """What a varlen kernel computes, one segment at a time with sdpa: causal attention (over the last `window`
    tokens, if given) within each segment of the flattened [N, heads, hd] tokens; empty (padding) segments are
    skipped."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    bounds = cu_seqlens.tolist()
    assert bounds[-1] == q.size(0) and max(b - a for a, b in zip(bounds, bounds[1:])) <= max_len
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                           attn_mask=model_module.doc_causal_dense(None, b - a, q.device, window))
            .transpose(0, 1) for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(outs)


def test_flash_attention_2_backend_plumbing_with_a_reference_kernel(monkeypatch):
    """The flash_attention_2 code path (flattened layouts, the loader's padded cu_seqlens, GQA head counts) with
    the CUDA kernel swapped for reference_varlen: equal to eager attention, forward and backward."""
    monkeypatch.setattr(model_module, "varlen_kernel", lambda: reference_varlen)
    idx, doc, cu = packed_batch()
    ref, varlen = tiny("eager"), tiny("flash_attention_2")
    _, want = ref(idx, idx, doc)
    _, got = varlen(idx, idx, doc, cu)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (name, p_ref), p in zip(ref.named_parameters(), varlen.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    # without cu_seqlens it derives them from doc_ids (the fallback, which syncs): the same result
    _, again = varlen(idx, idx, doc)
    torch.testing.assert_close(again, got)


def run(script, *args, timeout=120):
    """Run a core script (train.py, ...) or a tool as a module (tools.bench, ...) from the repository's root."""
    command = [sys.executable, script] if script.endswith(".py") else [sys.executable, "-m", script]
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_train_and_bench_count_the_same_flops_for_the_same_batch(prepared_data, tmp_path):
    """One train.py step and bench.py --batch=data (train.py's first batch) give the same attended fraction and
    FLOPs per token, from the real documents' lengths, and MFU = tokens/s x FLOPs per token / peak in both."""
    T = 256  # long enough that the first batch holds several documents
    proc = run("train.py", *TINY, f"--block_size={T}", f"--data_dir={prepared_data}", f"--out_dir={tmp_path}",
               "--device=cpu", "--max_steps=1", "--log_interval=1", "--eval_interval=0", "--save_strategy=no",
               "--warmup_tokens=128")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    logged = next(r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["step"] == 1)
    proc = run("tools.bench", *TINY, f"--block_size={T}", f"--data_dir={prepared_data}", "--device=cpu", "--batch=data",
               "--steps=1", "--warmup=0", "--json=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = json.loads(proc.stdout.strip().splitlines()[-1])
    # the fraction, computed here independently from the loader's doc_ids: sum of L(L+1)/2 over segments / B T^2
    _, _, doc_ids, _ = PackedLoader(prepared_data, "train", T, 2, seed=1337).next_batch()
    pairs = sum(int(n) * (int(n) + 1) // 2 for row in doc_ids for n in torch.bincount(row))
    assert logged["attn_fraction"] == pairs / (2 * T * T) < (T + 1) / (2 * T)  # packed documents: less than plain causal
    assert bench["attn_fraction"] == round(logged["attn_fraction"], 4)
    assert bench["flops_per_token"] == round(logged["flops_per_token"])
    assert logged["mfu"] == pytest.approx(logged["tokens_per_sec"] * logged["flops_per_token"] / 1e12, rel=1e-9)
    assert bench["mfu"] == pytest.approx(bench["tokens_per_s"] * bench["flops_per_token"] / 1e12, rel=2e-3, abs=1e-4)


def test_bench_profile_reports_where_the_step_goes():
    proc = run("tools.bench", *TINY[:-1], "--vocab_size=50304", "--device=cpu", "--what=profile", "--steps=2",
               "--warmup=1", "--json=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    shares = record["share_pct"]
    assert list(shares) == ["matmul", "attention", "head+loss", "norms+elementwise", "optimizer"]
    assert all(shares[c] > 0 for c in shares) and sum(shares.values()) == pytest.approx(100, abs=0.5)
    assert shares["head+loss"] > shares["attention"]  # a 50304-class head on a d32 model dominates
    assert record["time"].startswith("CPU") and record["step_ms"] > 0
    assert record["kernels_per_step"] > 100 and 0 <= record["gaps_pct"] < 100  # ops per step, on a CPU
    assert "ops per step" in run("tools.bench", *TINY[:-1], "--vocab_size=50304", "--device=cpu", "--what=profile",
                                 "--steps=1", "--warmup=1").stdout
    # the device's busy time: overlapping kernels (two streams) count once, the idle stretch between them not at all
    assert bench.busy_and_span([(10, 12), (11, 13), (15, 16), (12, 12.5)]) == (4, 6)
    assert bench.busy_and_span([]) == (0.0, 0.0)
    names = {row["name"]: row["category"] for row in record["top"]}
    assert len(record["top"]) == 15 and names.get("aten::_fused_adamw_") == "optimizer"  # AdamW beside Muon
    assert any(c == "attention" for n, c in names.items() if "scaled_dot_product" in n) or shares["attention"] > 0


def test_profile_on_cuda_reads_each_kernel_from_the_op_that_launched_it():
    """bench.py --what=profile on a GPU, with events shaped as torch 2.11's profiler makes them (a kernel's event has
    no linked_correlation_id; its launching CPU op lists it in .kernels): each kernel lands in the named range of its
    op, the device time no op launched is one item, and a kernel counts once however deep its op is nested."""
    from types import SimpleNamespace as Event
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernel = lambda name, us: Event(name=name, duration=us)  # noqa: E731  # torch's Kernel(name, device, duration)
    optimizer = Event(name="optimizer", device_type=cpu, kernels=[], cpu_parent=None)
    bmm = Event(name="aten::bmm", device_type=cpu, kernels=[kernel("sm90_gemm", 30.0)], cpu_parent=optimizer)
    mm = Event(name="aten::mm", device_type=cpu, kernels=[kernel("sm90_gemm", 50.0)], cpu_parent=None)
    on_device = [Event(name=n, device_type=cuda, kernels=[], cpu_parent=None, time_range=Event(start=a, end=b))
                 for n, a, b in (("sm90_gemm", 0, 30), ("sm90_gemm", 40, 90), ("ncclKernel_AllGather", 90, 110))]
    items = bench.timed_items([optimizer, bmm, mm, *on_device], "cuda")
    assert [(n, us, op.name if op else None) for n, us, op in items] == [
        ("sm90_gemm", 30.0, "aten::bmm"), ("sm90_gemm", 50.0, "aten::mm"),
        ("(device time launched by no profiled op)", 20, None)]
    assert not hasattr(on_device[0], "linked_correlation_id")


@pytest.mark.parametrize("args, fragments", [
    (["--compile_mode=fast"], ["compile_mode", "'fast'", "reduce-overhead", "max-autotune-no-cudagraphs"]),
    (["--attn_impl=flash_attention_2", "--device=cpu"], ["flash_attention_2", "CUDA", "bf16", "sdpa"]),
])
def test_speed_options_are_checked(args, fragments):
    proc = run("train.py", "--dry_run=True", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    for fragment in fragments:
        assert fragment in out, out


def test_bench_names_bad_configs_and_runs_small_vocabularies(prepared_data):
    """bench.py stops with one line for a model it cannot build or data its vocabulary cannot hold (was a traceback),
    and its synthetic batch fits a vocabulary smaller than GPT-2's (was an index error)."""
    for args, fragments in [(["--n_head=7"], ["bad model config", "d_model=768", "n_head=7"]),
                            (["--batch=data", f"--data_dir={prepared_data}", "--vocab_size=256"],
                             ["vocab_size=256", "tokenizer"])]:
        proc = run("tools.bench", "--device=cpu", *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out, out[-2000:]
        assert all(f in out for f in fragments), out
    proc = run("tools.bench", *TINY, "--device=cpu", "--vocab_size=256", "--steps=1", "--warmup=0", "--json=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"] > 0


def test_bench_doc_len_0_is_plain_causal_rows():
    """--doc_len=0 (nanoGPT's setting): no doc_ids, so sdpa runs is_causal, and MFU counts half the scores."""
    cfg = {"batch_size": 2, "block_size": 64, "vocab_size": 256, "doc_len": 0}
    x, y, doc_ids, cu_seqlens = bench.synthetic_batch(cfg, "cpu")
    assert doc_ids is None and cu_seqlens[:3].tolist() == [0, 64, 128] and set(cu_seqlens[2:].tolist()) == {128}
    _, _, doc_ids, _ = bench.synthetic_batch({**cfg, "doc_len": 16}, "cpu")
    assert doc_ids.max() > 0  # packed documents otherwise
    proc = run("tools.bench", *TINY, "--device=cpu", "--vocab_size=256", "--steps=1", "--warmup=0", "--json=True",
               "--doc_len=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["attn_fraction"] == round(65 / 128, 4)
    proc = run("tools.bench", "--device=cpu", "--doc_len=-1")
    assert proc.returncode != 0 and "doc_len=-1 must be >= 0" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# GPU only

def gpu_grads(model, idx, doc, cu):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx, doc, cu)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def assert_close_rel(got, want, tol, name):
    """bf16 kernels differ in rounding, not in what they compute: compare whole gradients by relative norm (a
    wrong mask or layout gives errors of order 1)."""
    err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-3)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


@cuda_only(NO_CUDA)
@pytest.mark.parametrize("attn_impl", ["flex_attention", "flash_attention_2"])
def test_gpu_backend_equals_eager_on_packed_documents(attn_impl):
    """Compiled flex (compile_layers) and the varlen kernel equal eager attention under bf16 autocast, forward and
    backward, on packed documents with the loader's padded cu_seqlens."""
    idx, doc, cu = (t.cuda() for t in packed_batch())
    ref = tiny("eager").cuda()
    model = tiny(attn_impl).cuda()
    if attn_impl == "flex_attention":
        model.compile_layers()
    want_loss, want = gpu_grads(ref, idx, doc, cu)
    got_loss, got = gpu_grads(model, idx, doc, cu)
    torch.testing.assert_close(got_loss, want_loss, atol=2e-2, rtol=1e-2)
    for (name, _), g, w in zip(ref.named_parameters(), got, want):
        assert_close_rel(g, w, 5e-2, name)


@cuda_only(NO_CUDA)
@pytest.mark.parametrize("attn_impl", ["flex_attention", "flash_attention_2"])
def test_gpu_compile_layers_no_recompiles_over_5_batches(attn_impl):
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny(attn_impl).cuda().compile_layers()
    try:
        for step in range(5):
            idx, doc, cu = (t.cuda() for t in packed_batch(seed=step))
            torch._dynamo.config.error_on_recompile = step > 0
            gpu_grads(model, idx, doc, cu)
    finally:
        torch._dynamo.config.error_on_recompile = False


@cuda_only(NO_CUDA)
def test_gpu_cuda_graphs_stay_correct_over_batches_of_varying_documents():
    """compile_mode='reduce-overhead' (CUDA graphs, replayed on static buffers): over 4 batches packed with different
    numbers of documents, each flex step's loss and gradients equal eager attention's on the same batch, so a graph
    recorded for one batch's masks never replays another's; no recompile after the first batch."""
    import torch._dynamo
    torch._dynamo.reset()
    ref = tiny("eager").cuda()
    model = tiny("flex_attention").cuda().compile_layers(mode="reduce-overhead")
    try:
        for step in range(4):
            idx, doc, cu = (t.cuda() for t in packed_batch(seed=step))
            torch._dynamo.config.error_on_recompile = step > 0
            ref.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            want_loss, want = gpu_grads(ref, idx, doc, cu)
            got_loss, got = gpu_grads(model, idx, doc, cu)
            torch.testing.assert_close(got_loss, want_loss, atol=2e-2, rtol=1e-2)
            for (name, _), g, w in zip(ref.named_parameters(), got, want):
                assert_close_rel(g, w, 5e-2, f"batch {step}: {name}")
    finally:
        torch._dynamo.config.error_on_recompile = False


@cuda_only(NO_CUDA)
def test_gpu_train_10_steps(prepared_data, tmp_path):
    proc = run("train.py", "--n_layer=2", "--n_head=2", "--d_model=64", "--block_size=256", "--batch_size=4",
               f"--data_dir={prepared_data}", f"--out_dir={tmp_path}", "--device=cuda", "--max_steps=10",
               "--log_interval=1", "--eval_interval=0", "--save_strategy=no", "--warmup_tokens=1024", "--lr=3e-3",
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {r["step"]: r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(steps) == list(range(1, 11))
    assert steps[10]["loss"] < steps[1]["loss"] and 0 < steps[10]["attn_fraction"] < 0.5


def test_bench_measures_each_optimizer_on_one_built_model(monkeypatch):
    """--optimizer=muon,adamw: one record per optimizer, in order, the model built once (and so compiled once, where
    it is built: the second step is built around the first's model); a list elsewhere than --what=train, or a
    wrong name, is refused."""
    built = []

    class Counted(Transformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)
    monkeypatch.setattr(bench, "Transformer", Counted)
    import settings
    cfg = {**settings.DEFAULTS, **bench.BENCH_DEFAULTS, "device": "cpu", "n_layer": 2, "n_head": 2, "d_model": 32,
           "block_size": 64, "batch_size": 2, "vocab_size": V, "dtype": "float32", "steps": 1, "warmup": 1,
           "compile": False, "optimizer": "muon,adamw"}
    records = bench.bench_train(cfg)
    assert [r["optimizer"] for r in records] == ["muon", "adamw"] and len(built) == 1
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in records)
    for args, fragment in [(["--optimizer=muon,adamz"], "'adamz' is not one of"),
                           (["--optimizer=muon,adamw", "--what=profile"], "a list of optimizers is for --what=train")]:
        proc = run("tools.bench", *TINY, "--device=cpu", *args)
        assert proc.returncode != 0 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bench_times_a_reference_model_file_by_the_same_loop(tmp_path):
    """--what=reference loads nanoGPT's model.py from a path (never part of this repo): its GPTConfig, GPT,
    configure_optimizers and get_num_params, trained by the loop that times smoltrain's step. A file with that
    interface stands in for it here; a missing path is refused with the clone command."""
    (tmp_path / "model.py").write_text('''
from dataclasses import dataclass
import torch
import torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.block_size, config.n_embd)
        self.mlp = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
    def get_num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
    def forward(self, idx, targets):
        h = self.mlp(self.wte(idx) + self.wpe(torch.arange(idx.size(1))))
        logits = h @ self.wte.weight.T
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
''')
    proc = run("tools.bench", *TINY, "--device=cpu", "--what=reference", f"--reference={tmp_path / 'model.py'}",
               "--grad_accum=2", "--steps=1", "--warmup=1", "--json=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["what"] == "reference" and record["batch"] == "2x64 x 2 micro-steps" and record["tokens_per_s"] > 0
    assert record["params_M"] == round((50304 * 32 + 32 * 32) / 1e6, 2)
    assert record["flops_per_token"] == 6 * (50304 * 32 + 32 * 32) + 12 * 2 * 32 * 64 * 0.5
    proc = run("tools.bench", *TINY, "--device=cpu", "--what=reference", "--reference=nowhere/model.py")
    assert proc.returncode != 0 and "git clone https://github.com/karpathy/nanoGPT" in proc.stderr
