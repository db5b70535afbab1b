"""The training recipe: Muon (optim.Muon and its parameter groups), the warmup-stable-decay schedule, validation in
bits per byte; unit tests on real tensors and train.py runs on the CPU (--device=cpu, gloo for 2 ranks)."""
import json
import math
import subprocess
import sys

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import checkpoint
import optim
import machine
from data import PackedLoader, read_meta
from conftest import ROOT
from model import ModelConfig, Transformer
from test_train import TINY, records, train

SMALL = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_orthogonalize_maps_matrices_to_singular_values_near_one(dtype):
    """Jordan's quintic Newton-Schulz, 5 steps: every singular value that is not tiny next to the matrix's Frobenius
    norm (from 2e-3 of it; the iteration's slope at 0 is 3.4445, so 5 steps raise small values ~485-fold) lands in
    the method's stated band (0.5, 1.5), whatever the scale and shape; the singular vectors are kept. In bf16 (the
    references', where it is native) and in fp32 (CPUs that emulate bf16)."""
    g = torch.Generator().manual_seed(0)
    u, _, v = torch.linalg.svd(torch.randn(48, 48, generator=g))
    cases = [torch.randn(*shape, generator=g) * scale for shape, scale in
             (((64, 64), 1.0), ((128, 32), 1e-3), ((32, 96), 50.0))]
    cases.append(u @ torch.diag(torch.logspace(-4, 0, 48)) @ v)  # singular values over 4 orders of magnitude
    for m in cases:
        out = optim.orthogonalize(m, dtype=dtype)
        assert out.shape == m.shape and out.dtype == dtype
        s_in, s_out = torch.linalg.svdvals(m), torch.linalg.svdvals(out.float())
        big = s_in / m.norm() >= 2e-3
        assert big.sum() >= len(s_in) // 2, "the case must exercise the band"
        assert s_out[big].min() > 0.5 and s_out.max() < 1.5, (m.shape, s_out[big].min(), s_out.max())
    # the vectors are m's: out ~ U S' V^T, so out^T m is symmetric positive semi-definite on m's row space
    m = cases[1]
    prod = optim.orthogonalize(m, dtype=dtype).float().T @ m
    assert torch.allclose(prod, prod.T, atol=2e-2 * prod.abs().max()) and torch.linalg.eigvalsh(prod).min() > -1e-3


def reference_muon_step(w, g, buf, lr, mu, dtype=torch.bfloat16):
    """The step written out: EMA momentum, Nesterov, Newton-Schulz in dtype, shape factor sqrt(max(1, rows/cols))."""
    buf = buf.lerp(g, 1 - mu)
    x = g.lerp(buf, mu).to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if tall else x
    return w - lr * math.sqrt(max(1, w.size(0) / w.size(1))) * x.float(), buf


def test_one_muon_step_equals_the_reference_and_torch_muon():
    torch.manual_seed(0)
    w0, grads = torch.randn(96, 32), [torch.randn(96, 32) for _ in range(3)]
    ours_w = w0.clone().requires_grad_()
    ours = optim.Muon([{"params": [ours_w], "muon": True}], lr=0.02, momentum_warmup_steps=0, ns_dtype=torch.bfloat16)
    theirs_w = w0.clone().requires_grad_()
    theirs = torch.optim.Muon([theirs_w], lr=0.02, momentum=0.95, weight_decay=0.0)
    ref_w, ref_buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        for w, opt in ((ours_w, ours), (theirs_w, theirs)):
            w.grad = g.clone()
            opt.step()
        ref_w, ref_buf = reference_muon_step(ref_w, g, ref_buf, 0.02, 0.95)
    torch.testing.assert_close(ours_w.detach(), ref_w, rtol=0, atol=2e-3)  # bf16 matmul order differs from ours
    torch.testing.assert_close(ours_w.detach(), theirs_w.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(ours_w.detach(), w0)
    # the momentum warm-up: step 1 uses 0.85 (nanochat's start), reached 0.95 at momentum_warmup_steps
    w = w0.clone().requires_grad_()
    warm = optim.Muon([{"params": [w], "muon": True}], lr=0.02, momentum_warmup_steps=300)
    w.grad = grads[0].clone()
    warm.step()
    # by default in the dtype whose matmuls this machine runs natively: bf16 with AMX or AVX512-BF16, else fp32
    native = getattr(torch, machine.default_dtype("cpu"))
    want, _ = reference_muon_step(w0, grads[0], torch.zeros_like(w0), 0.02, 0.85 + 0.1 / 300, native)
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=2e-3 if native == torch.bfloat16 else 1e-5)
    with pytest.raises(ValueError, match="2-D matrices"):
        optim.Muon([{"params": [torch.zeros(3, requires_grad=True)], "muon": True}])


def test_muon_groups_hold_every_block_matrix_and_adamw_the_rest():
    for family in ("deepone", "llama"):
        model = Transformer(ModelConfig(family=family, **SMALL))
        opt = optim.make_optimizer(model, "muon", "float32", 1e-3, (0.9, 0.95), 0.1, 0, "cpu", muon_lr=0.02)
        muon, decayed, plain = opt.param_groups
        block_matrices = [p for p in model.layers.parameters() if p.dim() == 2]
        assert muon["muon"] and [id(p) for p in muon["params"]] == [id(p) for p in block_matrices]
        assert len(block_matrices) == 7 * SMALL["n_layer"]  # q, k, v, o, gate, up, down
        assert {id(p) for p in decayed["params"]} == {id(model.tok_emb.weight), id(model.lm_head.weight)}
        assert all(p.dim() == 1 for p in plain["params"]) and not decayed["muon"] and not plain["muon"]
        counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
        assert counted == model.num_params()  # every parameter in exactly one group
        assert (muon["peak_lr"], decayed["peak_lr"], muon["weight_decay"], decayed["weight_decay"]) == (
            0.02, 1e-3, 0.0, 0.1)


MUON = TINY + ["--optimizer=muon", "--muon_lr=5e-3", "--eval_interval=0", "--save_interval=100"]


def test_muon_resumes_exactly_under_fsdp_and_ddp(prepared_data, tmp_path):
    """Muon on FSDP2 shards (each matrix gathered for its orthogonalization) gives DDP's run, and a stop and resume
    replays it bit for bit in either mode."""
    args = MUON + ["--batch_size=2", "--grad_accum=2", "--train_tokens=3072", "--warmup_tokens=1024"]
    train(tmp_path / "fsdp", prepared_data, *args, "--parallel=fsdp", ranks=2, timeout=180)
    train(tmp_path / "ddp", prepared_data, *args, "--max_steps=3", ranks=2, timeout=180)
    proc = train(tmp_path / "ddp", prepared_data, *args, ranks=2, timeout=180)
    assert "resuming from" in proc.stdout and "muon: 14 tensors" in proc.stdout
    fsdp, ddp = records(tmp_path / "fsdp"), records(tmp_path / "ddp")
    assert sorted(fsdp) == sorted(ddp) == list(range(1, 7))
    for s in range(1, 7):
        assert fsdp[s]["loss"] == pytest.approx(ddp[s]["loss"], rel=1e-5, abs=0), s
    assert ddp[6]["loss"] < ddp[1]["loss"] - 0.5
    # the FSDP run stopped and resumed: the same bits
    train(tmp_path / "fsdp2", prepared_data, *args, "--parallel=fsdp", "--max_steps=3", ranks=2, timeout=180)
    train(tmp_path / "fsdp2", prepared_data, *args, "--parallel=fsdp", ranks=2, timeout=180)
    again = records(tmp_path / "fsdp2")
    assert [again[s]["loss"] for s in range(1, 7)] == [fsdp[s]["loss"] for s in range(1, 7)]
    assert again[6]["param_checksum"] == fsdp[6]["param_checksum"]


def wsd_lr(tokens, peak, floor, warmup, total, decay_frac, per_step):
    if tokens < warmup:
        return peak * min(1.0, (tokens + per_step) / warmup)
    start = max(warmup, (1 - decay_frac) * total)
    return peak * (1 - min(1.0, max(0.0, tokens - start) / (total - start)) * (1 - floor))


def test_wsd_schedule_bf16_muon_exact_resume_and_a_batch_size_change(prepared_data, tmp_path):
    """WSD in tokens: the logged LRs are the schedule's at each step's token count, also after a resume that doubles
    the batch; bf16 weights with Muon (stochastic rounding) resume bit for bit."""
    args = MUON + ["--batch_size=2", "--train_tokens=2048", "--warmup_tokens=256", "--lr_schedule=wsd",
                   "--decay_frac=0.5", "--param_dtype=bfloat16", "--dtype=auto", "--lr=3e-3", "--min_lr=3e-4"]
    train(tmp_path / "a", prepared_data, *args)
    train(tmp_path / "b", prepared_data, *args, "--max_steps=8")
    train(tmp_path / "b", prepared_data, *args)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a] and a[16]["param_checksum"] == b[16]["param_checksum"]
    peak, muon_peak = 3e-3 * math.sqrt(2), 5e-3 * math.sqrt(2)
    for s, r in a.items():  # 128 tokens a step; a step's LR is set from the tokens seen before it
        assert r["lr"] == pytest.approx(wsd_lr((s - 1) * 128, peak, 0.1, 256, 2048, 0.5, 128), rel=1e-9), s
        assert r["muon_lr"] == pytest.approx(r["lr"] * 5 / 3, rel=1e-9)
    assert a[4]["lr"] == a[8]["lr"] == pytest.approx(peak) and a[16]["lr"] < a[12]["lr"] < a[8]["lr"]
    # a resume at step 8 with twice the batch: the schedule goes on by tokens, now 256 a step
    train(tmp_path / "c", prepared_data, *args, "--max_steps=8")
    train(tmp_path / "c", prepared_data, *args, "--batch_size=4", timeout=180)
    c = records(tmp_path / "c")
    assert sorted(c) == list(range(1, 13)) and c[12]["tokens"] == 2048
    for s in range(9, 13):
        want = wsd_lr(1024 + (s - 9) * 256, 3e-3 * 2, 0.1, 256, 2048, 0.5, 256)
        assert c[s]["lr"] == pytest.approx(want, rel=1e-9), s
    assert c[12]["muon_lr"] == pytest.approx(c[12]["lr"] * 5 / 3)
    assert muon_peak > peak


def test_val_bpb_equals_a_hand_computation(prepared_data, tmp_path):
    """val_bpb/<subset> = nats summed over the val batches' text targets / (ln 2 x their UTF-8 bytes), with
    <|endoftext|> targets in neither sum: recomputed here from the checkpoint with full logits and tiktoken."""
    args = TINY + ["--batch_size=2", "--block_size=256", "--train_tokens=1024", "--eval_interval=0",
                   "--save_interval=100"]  # rows long enough to span documents
    train(tmp_path, prepared_data, *args)
    logged = records(tmp_path, "val_bpb/cosmopedia-v2")[2]
    ckpt = checkpoint.load(checkpoint.latest(str(tmp_path)))
    model = Transformer(ModelConfig(**{**ckpt["model_config"], "attn_impl": "sdpa"}))
    model.load_state_dict(ckpt["model"])
    enc, eot = tiktoken.get_encoding("r50k_base"), read_meta(prepared_data)["eot_token"]
    for subset in ("cosmopedia-v2", "fineweb-edu-dedup"):
        loader = PackedLoader(prepared_data, "val", 256, 2, rank=0, world_size=1, seed=1337, subset=subset)
        nats = n_bytes = loss_sum = boundaries = 0
        for _ in range(2):  # TINY's eval_iters
            x, y, doc_ids, _ = loader.next_batch()
            with torch.no_grad():
                logits, _ = model(x, doc_ids=doc_ids)
            ce = F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="none")
            text = y.flatten() != eot
            nats += ce[text].sum().item()
            n_bytes += sum(len(enc.decode_single_token_bytes(t)) for t in y.flatten()[text].tolist())
            loss_sum += ce.mean().item()
            boundaries += int((~text).sum())
        assert logged[f"val_bpb/{subset}"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
        assert logged[f"val_loss/{subset}"] == pytest.approx(loss_sum / 2, rel=1e-5)
        assert boundaries > 0  # the batches do hold document boundaries, which bpb leaves out


def checkpoint_steps(out_dir):
    return [int(p[-11:-3]) for p in checkpoint.all_checkpoints(str(out_dir))]


def test_keep_best_survives_rotation_and_resume(prepared_data, tmp_path):
    """keep_best: the checkpoint of the lowest mean validation loss stays beside the newest keep_last, also after a
    resume whose evaluations are worse (an LR that wrecks the weights) and a second resume."""
    args = TINY + ["--batch_size=2", "--train_tokens=4096", "--eval_interval=2", "--save_interval=2",
                   "--keep_last=1", "--keep_best=True"]
    proc = train(tmp_path, prepared_data, *args, "--max_steps=4")
    assert "best | mean val loss" in proc.stdout and checkpoint_steps(tmp_path) == [4]
    val = records(tmp_path, "val_loss/cosmopedia-v2")
    best_step = min(val, key=lambda s: val[s]["val_loss/cosmopedia-v2"] + val[s]["val_loss/fineweb-edu-dedup"])
    assert best_step == 4
    wreck = ["--lr=100", "--min_lr=10", "--divergence_margin=0"]
    train(tmp_path, prepared_data, *args, *wreck, "--max_steps=8")
    val = records(tmp_path, "val_loss/cosmopedia-v2")
    assert val[8]["val_loss/cosmopedia-v2"] > val[4]["val_loss/cosmopedia-v2"] + 1, val  # the later evaluations are worse
    assert checkpoint_steps(tmp_path) == [4, 8]  # the best, and the newest one (keep_last=1)
    assert checkpoint.load(checkpoint.latest(str(tmp_path)))["best"]["step"] == 4
    # 'best' names it: sample.py (--ckpt_path=best, DIR/best), tools/export.py, init_weights=DIR/best
    best_path = str(tmp_path / "ckpt-00000004.pt")
    assert checkpoint.find(str(tmp_path), "best") == best_path == checkpoint.find("elsewhere", str(tmp_path / "best"))
    for ckpt_arg in ("best", str(tmp_path / "best")):
        proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}", f"--ckpt_path={ckpt_arg}",
                               "--device=cpu", "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and f"{best_path}: step 4," in proc.stderr, proc.stderr[-2000:]
    from tools import export
    assert export.load_model(str(tmp_path), "best")[1:] == (best_path, 4)
    proc = train(tmp_path / "from_best", prepared_data, *args, "--max_steps=1", f"--init_weights={tmp_path / 'best'}")
    assert f"starting from the weights of {best_path}" in proc.stdout, proc.stdout[-2000:]
    proc = train(tmp_path, prepared_data, *args, *wreck, "--max_steps=10")
    assert "best |" not in proc.stdout and checkpoint_steps(tmp_path) == [4, 10], proc.stdout


def test_divergence_stop_fires_and_keeps_the_checkpoints_before_it(prepared_data, tmp_path):
    """A run whose loss climbs (resumed with an LR that wrecks the weights) stops with exit status 1 at the log point
    where the short loss average passes the long one by the margin, naming the step and both averages; the
    checkpoint before the spike stays, and none is written after it."""
    args = TINY + ["--batch_size=2", "--train_tokens=4096", "--eval_interval=0", "--save_interval=2"]
    train(tmp_path, prepared_data, *args, "--max_steps=4")
    assert checkpoint.load(checkpoint.latest(str(tmp_path)))["loss_ema"]["short"] > 0  # carried over the resume
    proc = train(tmp_path, prepared_data, *args, "--lr=1.0", "--min_lr=0.1", "--divergence_margin=0.5", ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    logged = records(tmp_path)
    stopped = max(logged)
    assert 5 <= stopped < 32 and f"the train loss is diverging at step {stopped}" in proc.stdout
    assert "(EMA 0.1) is more than divergence_margin=0.5 above its long one" in proc.stdout
    assert logged[stopped]["loss"] > logged[4]["loss"] + 1
    assert checkpoint_steps(tmp_path)[-1] < stopped and "ckpt-00000004.pt" in proc.stdout
    # the same climb with the stop turned off trains on
    proc = train(tmp_path, prepared_data, *args, "--lr=1.0", "--min_lr=0.1", "--divergence_margin=0", "--max_steps=8")
    assert checkpoint_steps(tmp_path)[-1] == 8


def test_a_wsd_run_extends_from_a_stable_phase_checkpoint(prepared_data, tmp_path):
    """Resumed during the stable phase with a larger train_tokens, a WSD run stays at its peak LR longer and decays
    at the end of the new budget: the README's way to continue a finished run."""
    args = TINY + ["--batch_size=2", "--warmup_tokens=256", "--lr_schedule=wsd", "--decay_frac=0.5",
                   "--eval_interval=0", "--save_interval=2", "--keep_last=10"]
    train(tmp_path / "short", prepared_data, *args, "--train_tokens=1024")  # 8 steps, decaying from step 5
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "ckpt-00000002.pt").write_bytes((tmp_path / "short" / "ckpt-00000002.pt").read_bytes())
    train(tmp_path / "long", prepared_data, *args, "--train_tokens=2048")  # 16 steps, decaying from step 9
    short, long = records(tmp_path / "short"), records(tmp_path / "long")
    assert sorted(long) == list(range(3, 17))
    peak = short[2]["lr"]
    assert short[8]["lr"] < peak and long[8]["lr"] == peak and long[16]["lr"] < long[12]["lr"] < peak
    for s in range(3, 17):  # the schedule of a 2048-token run from step 3 on
        assert long[s]["lr"] == pytest.approx(wsd_lr((s - 1) * 128, peak, 0.1, 256, 2048, 0.5, 128), rel=1e-9), s


def test_time_to_target_is_read_where_a_known_curve_crosses_the_target(tmp_path):
    """tools/bench_recipe.py's first_reach: linear between the evaluation before the crossing and the first one at or
    below the target, in steps, tokens and training seconds alike; from the start (0, 0, 0) when the first evaluation
    is already below; None when the curve never gets there."""
    from tools.bench_recipe import first_reach, val_curve
    curve = [(10, 1000, 5.0, 3.0), (20, 2000, 9.0, 2.5), (30, 3000, 13.0, 2.0), (40, 4000, 17.0, 2.2)]
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, tokens, seconds, bpb in curve:
            f.write(json.dumps({"step": step, "loss": 9.0, "tokens": tokens}) + "\n")  # a train record: ignored
            f.write(json.dumps({"step": step, "tokens": tokens, "train_s": seconds, "val_loss/a": 2 * bpb,
                                "val_loss/b": 2 * bpb, "val_bpb/a": bpb - 0.1, "val_bpb/b": bpb + 0.1}) + "\n")
    read = val_curve(tmp_path)
    assert [p["bpb"] for p in read] == pytest.approx([c[3] for c in curve])
    assert first_reach(read, 2.25) == pytest.approx({"step": 25.0, "tokens": 2500.0, "train_s": 11.0})
    assert first_reach(read, 2.0) == pytest.approx({"step": 30.0, "tokens": 3000.0, "train_s": 13.0})
    assert first_reach(read, 3.5) == pytest.approx({"step": 10.0, "tokens": 1000.0, "train_s": 5.0})
    assert first_reach(read, 1.9) is None


def test_time_to_target_of_a_real_run(tmp_path, prepared_data):
    """bench_recipe.py --target_bpb over a tiny train.py run (--device=cpu): train.py logs train_s, the steps'
    summed wall clock, with every evaluation, growing with the steps and below the run's elapsed time; the table
    gives the step of the first evaluation that reaches the run's best bpb, and the seconds logged there."""
    out = tmp_path / "recipes"
    shape = ["--n_layer=1", "--n_head=2", "--d_model=32", "--block_size=64", "--batch_size=2", "--train_tokens=1536",
             "--warmup_tokens=256", "--eval_interval=2", "--eval_iters=2", "--log_interval=2"]
    bench = [sys.executable, "-m", "tools.bench_recipe", f"--data_dir={prepared_data}", "--recipes=default",
             "--seeds=1337", f"--out={out}"]
    first = subprocess.run([*bench, "--", *shape], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    evals = [r for r in records(out / "default-s1337", "val_bpb/fineweb-edu-dedup").values()]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    seconds = [r["train_s"] for r in evals]
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:]))
    elapsed = records(out / "default-s1337", "elapsed_s")[12]["elapsed_s"]
    assert seconds[-1] <= elapsed
    curve = [sum(v for k, v in r.items() if k.startswith("val_bpb/")) / 2 for r in evals]
    best = curve.index(min(curve))
    again = subprocess.run([*bench, f"--target_bpb={curve[best]!r}", "--", *shape], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)  # the finished run is read again, not trained
    assert again.returncode == 0, again.stderr[-3000:]
    row = next(line for line in again.stdout.splitlines()[::-1] if line.startswith("| default |"))
    assert row == (f"| default | {evals[best]['train_s']:,.1f} | {evals[best]['step']:,.1f} | "
                   f"{evals[best]['tokens']:,.0f} |")
