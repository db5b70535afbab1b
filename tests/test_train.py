"""train.py and sample.py as users run them: real processes, real torchrun with 2 gloo ranks on the CPU, real files.

The model is tiny (2 layers, d_model 32, GPT-2 vocab) and the data is conftest's prepared_data, so a step takes
milliseconds and most of the time goes to starting processes. Runs are shared where one run can show several things:
the 2-rank baseline (`base2`) is checked for learning and rank agreement and is also the uninterrupted reference for
the resume, dispatch and grad-accumulation runs.
"""
import io
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from conftest import ROOT, cuda_only, offline_env, run_prepare, write_hub_layout
from data import count_tokens, read_meta

# --device=cpu (and so gloo under torchrun): these tests are about CPU behaviour and must pass unchanged on a GPU machine
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--d_model=32", "--block_size=64", "--compile=False", "--warmup_tokens=512",
        "--lr=3e-3", "--min_lr=3e-4", "--log_interval=1", "--eval_iters=2", "--log_checksums=True", "--dtype=float32"]
# 2 ranks x batch 2 x grad_accum 2 x 64 tokens = 512 tokens per step; 8 steps
BASE2 = TINY + ["--batch_size=2", "--grad_accum=2", "--train_tokens=4096", "--warmup_tokens=1024", "--eval_interval=4",
                "--save_interval=4"]


def command(ranks, script="train.py"):
    """train.py (or another core script, or a tool's module such as tools.export) as a command line."""
    if ranks is None:
        return [sys.executable, script] if script.endswith(".py") else [sys.executable, "-m", script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script]


def run(args, ranks=None, script="train.py", timeout=120, env=None):
    """Run train.py (single process, or torchrun with `ranks` ranks) to completion; returns the CompletedProcess."""
    return subprocess.run(command(ranks, script) + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def train(out_dir, data, *args, ranks=None, ok=True, **kw):
    proc = run([f"--data_dir={data}", f"--out_dir={out_dir}", *args], ranks=ranks, **kw)
    if ok:
        assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def records(out_dir, key="loss"):
    """log.jsonl records carrying `key`, by step (a later record for the same step wins, as after a resume)."""
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if key in r}


def val_scores(out_dir):
    """The validation losses and bpb of each evaluation, by step (without train_s, the wall clock it was logged at)."""
    return {step: {k: v for k, v in r.items() if k.startswith("val_")}
            for step, r in records(out_dir, "val_loss/cosmopedia-v2").items()}


def assert_one_clear_error(proc, *fragments):
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stdout + proc.stderr, f"{fragment!r} not in:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def base2(prepared_data, tmp_path_factory):
    """The 2-rank baseline: 8 uninterrupted steps with grad_accum=2, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("base2")
    train(out, prepared_data, *BASE2, ranks=2)
    return out


def test_two_ranks_learn_and_keep_identical_weights(base2):
    run = records(base2, "run")[0]["run"]  # each launch logs what it resolved 'auto' to
    assert (run["world_size"], run["device"], run["parallel"], run["backend"], run["dtype"], run["attn_impl"]) == (
        2, "cpu", "ddp", "gloo", "float32", "sdpa")
    steps = records(base2)
    assert sorted(steps) == list(range(1, 9))
    losses = [steps[s]["loss"] for s in range(1, 9)]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns: ln(50304) = 10.8 falls fast on repetitive text
    for s, r in steps.items():
        a, b = r["param_checksum"]
        assert a == b, f"the ranks' weights differ after step {s}"
        assert r["batch_checksum"][0] != r["batch_checksum"][1]  # ... though each rank read different data
        assert r["tokens"] == 512 * s and math.isfinite(r["grad_norm"]) and r["tokens_per_sec"] > 0
    assert len({r["param_checksum"][0] for r in steps.values()}) == 8  # and the weights do change every step
    lrs = [steps[s]["lr"] for s in range(1, 9)]
    peak = 3e-3 * math.sqrt(2 * 2 * 2)  # lr scaled by sqrt(batch_size x grad_accum x world_size)
    # the default schedule, warmup-stable-decay: the peak until the last half of train_tokens, then a linear decay
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == lrs[4] == pytest.approx(peak) and lrs[4] > lrs[5] > lrs[7]
    evals = records(base2, key="val_loss/cosmopedia-v2")
    assert sorted(evals) == [4, 8]
    for r in evals.values():
        assert math.isfinite(r["val_loss/fineweb-edu-dedup"])
    assert evals[8]["val_loss/cosmopedia-v2"] < evals[4]["val_loss/cosmopedia-v2"]


def test_checkpoint_format(base2):
    assert [Path(p).name for p in checkpoint.all_checkpoints(str(base2))] == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    ckpt = torch.load(base2 / "ckpt-00000008.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["tokens_seen"] == 4096 and ckpt["world_size"] == 2
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    assert ckpt["model_config"]["d_model"] == 32 and ckpt["config"]["grad_accum"] == 2
    assert [s["rank"] for s in ckpt["data_states"]] == [0, 1]
    assert len(ckpt["rng_states"]) == 2 and isinstance(ckpt["rng_states"][1]["torch"], torch.Tensor)
    assert "state" in ckpt["optimizer"] and "param_groups" in ckpt["optimizer"]
    # checkpoint.load (train.py's and sample.py's) memory-maps the file instead of reading it into this process
    loaded = checkpoint.load(str(base2 / "ckpt-00000004.pt"))
    assert str(base2 / "ckpt-00000004.pt") in Path("/proc/self/maps").read_text()
    assert torch.equal(loaded["model"]["tok_emb.weight"], torch.load(base2 / "ckpt-00000004.pt")["model"]["tok_emb.weight"])


def test_dispatch_then_exact_resume_with_two_ranks(base2, prepared_data, tmp_path):
    # Steps 1-3 with rank 0 reading all data and scattering it: each rank gets the batches it would have read.
    proc = train(tmp_path, prepared_data, *BASE2, "--dispatch_batches=True", "--max_steps=3", ranks=2)
    assert "saved" in proc.stdout and sorted(records(tmp_path)) == [1, 2, 3]  # stopped early, after a checkpoint
    assert "step 3/3 |" in proc.stdout  # the step counter counts to where this run stops, not the schedule's end (8)
    assert checkpoint.latest(str(tmp_path)).endswith("ckpt-00000003.pt")
    base = records(base2)
    for s, r in records(tmp_path).items():
        assert r["batch_checksum"] == base[s]["batch_checksum"], f"dispatched batches differ at step {s}"
        assert r["loss"] == base[s]["loss"] and r["param_checksum"] == base[s]["param_checksum"]
    # Resume without dispatch: the same losses and weights as the uninterrupted run, bit for bit, to its end.
    proc = train(tmp_path, prepared_data, *BASE2, ranks=2)
    assert "resuming from" in proc.stdout and "step 3" in proc.stdout
    resumed = records(tmp_path)
    assert sorted(resumed) == list(range(1, 9))
    for s in range(4, 9):
        assert resumed[s]["loss"] == base[s]["loss"], f"step {s}: {resumed[s]['loss']} != {base[s]['loss']}"
        assert resumed[s]["param_checksum"] == base[s]["param_checksum"]
        assert resumed[s]["lr"] == base[s]["lr"]
    assert val_scores(tmp_path)[8] == val_scores(base2)[8]


def test_grad_accumulation_equals_the_larger_batch(base2, prepared_data, tmp_path):
    # 2 ranks x batch 4 x 1 micro-step reads the same rows as 2 ranks x batch 2 x 2 micro-steps (with no_sync).
    train(tmp_path, prepared_data, *BASE2, "--batch_size=4", "--grad_accum=1", "--max_steps=4", ranks=2)
    base = records(base2)
    for s, r in records(tmp_path).items():
        assert r["lr"] == base[s]["lr"]  # sqrt(4 x 1 x 2) == sqrt(2 x 2 x 2)
        assert r["loss"] == pytest.approx(base[s]["loss"], rel=1e-5, abs=0)
        assert r["grad_norm"] == pytest.approx(base[s]["grad_norm"], rel=1e-4, abs=0), f"gradients differ at step {s}"


def test_exact_resume_with_one_rank(prepared_data, tmp_path):
    # (eval_iters=1000 asks for more val batches than the val shards hold: capped at one pass, with a warning)
    # every per-token model option on: their parameters must resume exactly, in the right optimizer groups
    args = TINY + ["--batch_size=2", "--train_tokens=768", "--eval_interval=0", "--save_interval=100",
                   "--eval_iters=1000", "--value_embeds=True", "--x0_mixing=True", "--smear=True",
                   "--window_pattern=SL", "--short_window=16"]
    proc = train(tmp_path / "a", prepared_data, *args)
    for subset in ("cosmopedia-v2", "fineweb-edu-dedup"):
        share = read_meta(prepared_data)["subsets"][subset]["val"]["tokens"]
        assert (f"warning: the {subset} val shard holds {share:,} tokens per rank of 1: validation reads "
                f"{share // 130} batches of 2 x 64, not eval_iters=1000") in proc.stdout
    train(tmp_path / "b", prepared_data, *args, "--max_steps=2")
    assert sorted(records(tmp_path / "b")) == [1, 2]
    train(tmp_path / "b", prepared_data, *args)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    assert a[6]["param_checksum"] == b[6]["param_checksum"]
    # the end of the schedule evaluates and saves; a rerun has nothing left to do
    assert sorted(records(tmp_path / "b", "val_loss/cosmopedia-v2")) == [6]
    proc = train(tmp_path / "b", prepared_data, *args)
    assert "schedule is complete" in proc.stdout
    # a resume with other optimizer settings trains with them (the checkpoint brings its own), and says so
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    for name in os.listdir(tmp_path / "c"):
        if name.startswith("ckpt-") and name != "ckpt-00000002.pt":
            os.remove(tmp_path / "c" / name)
    proc = train(tmp_path / "c", prepared_data, *args, "--weight_decay=0.05", "--beta2=0.99")
    assert "resume: optimizer weight_decay: checkpoint 0.0, this run 0.05 (this run's value applies)" in proc.stdout
    assert "resume: optimizer betas: checkpoint (0.8, 0.95), this run (0.8, 0.99)" in proc.stdout
    groups = checkpoint.load(checkpoint.latest(str(tmp_path / "c")))["optimizer"]["param_groups"]
    # Muon's 3 groups: the Blocks' matrices and the gains are never decayed, the embedding and head are
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.0, (0.8, 0.99)), (0.05, (0.8, 0.99)),
                                                                        (0.0, (0.8, 0.99))]
    # 2 layers x 7 matrices + the last layer's value gate | token embedding, head, the last layer's value
    # embedding, smear's gate | 2 x 4 norm gains (attn, q, k, ffn), 2 x (resid_scale, x0_scale), backout_scale,
    # smear_scale, the final norm
    assert [len(g["params"]) for g in groups] == [15, 4, 15]
    c = records(tmp_path / "c")
    assert c[2]["loss"] == a[2]["loss"] and c[6]["loss"] != a[6]["loss"]


def worker_pids(torchrun_pid):
    """{rank: pid} of torchrun's worker processes."""
    pids = {}
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                pids[rank] = int(pid)
    return pids


def wait_for(predicate, timeout, proc, what):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def start(out_dir, data, *args, ranks=None):
    """Start train.py in the background; its output goes to out_dir/../stdout.txt (a pipe could fill up)."""
    with open(Path(out_dir).parent / "stdout.txt", "w") as f:
        return subprocess.Popen(command(ranks) + [f"--data_dir={data}", f"--out_dir={out_dir}", *args], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, text=True)


def output(out_dir):
    return (Path(out_dir).parent / "stdout.txt").read_text()


def logged_steps(out_dir):
    path = Path(out_dir) / "log.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_on_one_rank_saves_and_exits_0(prepared_data, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--batch_size=2", "--train_tokens=10000000", "--eval_interval=0", "--save_interval=100000"]
    proc = start(out, prepared_data, *args, ranks=2)
    try:
        wait_for(lambda: logged_steps(out) >= 3, 60, proc, "3 logged steps")
        os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)  # preempt rank 1 only: rank 0 must stop with it
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = output(out)
    assert proc.returncode == 0, text[-3000:]
    assert "stopping on a signal on another rank after step" in text
    last = max(records(out))
    assert checkpoint.latest(str(out)).endswith(f"ckpt-{last:08d}.pt")
    ckpt = checkpoint.load(checkpoint.latest(str(out)))
    assert ckpt["step"] == last and len(ckpt["data_states"]) == 2


def test_sigint_single_process_saves_and_exits_0(prepared_data, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--batch_size=2", "--train_tokens=10000000", "--eval_interval=0", "--save_interval=100000"]
    proc = start(out, prepared_data, *args)
    try:
        wait_for(lambda: logged_steps(out) >= 2, 60, proc, "2 logged steps")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = output(out)
    assert proc.returncode == 0, text[-3000:]
    assert "stopping on SIGINT after step" in text
    assert checkpoint.latest(str(out)).endswith(f"ckpt-{max(records(out)):08d}.pt")


def test_kill_9_during_save_keeps_the_previous_checkpoint(prepared_data, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--batch_size=2", "--train_tokens=10000000", "--eval_interval=0", "--save_interval=1",
                   "--keep_last=2", "--log_checksums=False"]
    proc = start(out, prepared_data, *args)
    try:
        wait_for(lambda: len(checkpoint.all_checkpoints(str(out))) == 2, 60, proc, "two checkpoints")
        for attempt in range(200):  # freeze the process while it writes a checkpoint, then kill it there
            wait_for(lambda: any(out.glob("*.pt.tmp")), 30, proc, "a checkpoint being written")
            proc.send_signal(signal.SIGSTOP)
            if any(out.glob("*.pt.tmp")):
                break
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    partial = list(out.glob("*.pt.tmp"))
    assert len(partial) == 1, "the process was not stopped mid-save"
    previous = checkpoint.latest(str(out))
    assert len(checkpoint.all_checkpoints(str(out))) == 2  # keep_last
    step = int(Path(previous).name[5:13])
    ckpt = checkpoint.load(previous)
    assert ckpt["step"] == step and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # resuming picks the complete checkpoint, ignores the partial one, and clears it at the next save
    proc = train(out, prepared_data, *args, f"--max_steps={step + 2}")
    assert f"resuming from {previous}: step {step}" in proc.stdout
    assert not list(out.glob("*.pt.tmp"))
    assert checkpoint.latest(str(out)).endswith(f"ckpt-{step + 2:08d}.pt")
    logged = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, step + 3))  # the killed run's records past its checkpoint are gone: no step twice


def test_non_finite_loss_stops_without_saving(prepared_data, tmp_path):
    # An absurd LR blows the weights up after one step; step 2's loss is NaN and must never reach a checkpoint.
    args = TINY + ["--batch_size=2", "--train_tokens=4096", "--eval_interval=0", "--save_interval=1",
                   "--lr=1e30", "--min_lr=0", "--warmup_tokens=0"]
    proc = train(tmp_path, prepared_data, *args, ok=False)
    assert_one_clear_error(proc, "non-finite loss", "at step 2", "last good checkpoint is", "ckpt-00000001.pt")
    assert [Path(p).name for p in checkpoint.all_checkpoints(str(tmp_path))] == ["ckpt-00000001.pt"]


def test_overflowed_weights_are_never_saved_and_infinite_lr_is_refused(prepared_data, tmp_path):
    # Step 1's loss and gradients are finite; its update multiplies the weights by 1 - lr x weight_decay = -1.4e39,
    # which overflows fp32: the save after it must be refused, not write inf/NaN weights and exit 0.
    args = TINY + ["--batch_size=2", "--train_tokens=4096", "--eval_interval=0", "--save_interval=1",
                   "--warmup_tokens=0", "--min_lr=0", "--log_checksums=False"]
    proc = train(tmp_path / "a", prepared_data, *args, "--lr=1e37", "--weight_decay=100", "--max_steps=1",
                 ok=False)
    assert_one_clear_error(proc, "non-finite weights after step 1", "stopped without saving",
                           "last good checkpoint is (none)", "lower --lr")
    assert checkpoint.all_checkpoints(str(tmp_path / "a")) == []
    # an LR that is infinite once scaled by sqrt(global batch) is refused before anything starts
    proc = train(tmp_path / "b", prepared_data, *args, "--lr=1e308", "--batch_size=8", "--max_steps=1", ok=False)
    assert_one_clear_error(proc, "lr=1e+308 gives an LR of 1e+308 x sqrt(8) = inf", "must be a finite number")
    # finite in Python, but AdamW's fp32 step size lr / (1 - beta1) would overflow (was a traceback from torch)
    proc = run(["--device=cpu", "--lr=1e300", "--dry_run=True"])
    assert_one_clear_error(proc, "lr=1e+300 gives an LR of", "below float32's 3.4e+38 x (1 - beta1)")
    proc = run(["--device=cpu", "--beta1=1", "--dry_run=True"])
    assert_one_clear_error(proc, "beta1=1, beta2=0.95: both must lie in [0, 1)")
    proc = run(["--device=cpu", "--lr=1e-4", "--min_lr=1e-3", "--dry_run=True"])
    assert_one_clear_error(proc, "min_lr=0.001 is above lr=0.0001")
    proc = run(["--device=cpu", "--n_layer=0", "--dry_run=True"])
    assert_one_clear_error(proc, "bad model config: n_layer=0: model sizes must be >= 1")
    proc = run(["--device=cpu", "--save_interval=0", "--keep_last=-1", "--dry_run=True"])  # the bad ones, named
    assert_one_clear_error(proc, "keep_last=-1, save_interval=0: batch_size, ", "must be >= 1")
    proc = run(["--device=cpu", "--grad_clip=-1", "--dry_run=True"])
    assert_one_clear_error(proc, "grad_clip=-1.0: max_steps, ", "must be >= 0")
    proc = run(["--device=cpu", "--step_cadence=0", "--dry_run=True"])
    assert_one_clear_error(proc, "step_cadence=0.0 must be > 0")


def test_logged_peak_memory_is_in_gib(prepared_data, tmp_path):
    """peak_mem_gb on the CPU is the process's peak RSS in GiB (2^30 bytes, tools/bench.py's and memory_estimate.py's unit): at
    most the peak the kernel reports for the whole process when it exits, and close to it."""
    # batch 16 x 64: the head's logits make the training steps the process's peak, not the save that follows
    args = TINY + ["--batch_size=16", "--train_tokens=2048", "--eval_interval=0", "--save_strategy=no"]
    with open(tmp_path / "stdout.txt", "w") as f:
        proc = subprocess.Popen(command(None) + [f"--data_dir={prepared_data}", f"--out_dir={tmp_path}", *args],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / "stdout.txt").read_text()[-3000:]
    final_gib = usage.ru_maxrss * 1024 / 2**30  # Linux: KiB
    logged = records(tmp_path)[2]["peak_mem_gb"]
    assert 0.97 * final_gib <= logged <= final_gib, (logged, final_gib)


def test_two_identical_runs_store_identical_checkpoints(prepared_data, tmp_path):
    """Every RNG a checkpoint stores (torch, Python, numpy) is seeded from `seed`: same command, same bytes, but for
    the training time it records (train_seconds, a wall clock): the checkpoints without it serialize identically."""
    args = TINY + ["--batch_size=2", "--train_tokens=256", "--eval_interval=0", "--log_checksums=False"]
    train(tmp_path / "run", prepared_data, *args)
    (tmp_path / "run").rename(tmp_path / "first")  # the same out_dir for both: the config inside names it
    train(tmp_path / "run", prepared_data, *args)
    first, second = (sorted(Path(d).glob("ckpt-*.pt")) for d in (tmp_path / "first", tmp_path / "run"))
    assert [p.name for p in first] == [p.name for p in second] == ["ckpt-00000002.pt"]
    states = [torch.load(p[0], weights_only=True) for p in (first, second)]
    assert all(state.pop("train_seconds") > 0 for state in states)
    serialized = []
    for state in states:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        serialized.append(buffer.getvalue())
    assert serialized[0] == serialized[1]


def test_adafactor_and_bf16_autocast_on_cpu(prepared_data, tmp_path):
    args = TINY + ["--batch_size=2", "--train_tokens=768", "--eval_interval=0", "--optimizer=adafactor",
                   "--dtype=bfloat16", "--warmup_tokens=0"]
    proc = train(tmp_path, prepared_data, *args, "--max_steps=3")
    assert "bfloat16" in proc.stdout
    train(tmp_path, prepared_data, *args)  # resumes Adafactor's state from the checkpoint
    steps = records(tmp_path)
    assert sorted(steps) == list(range(1, 7)) and steps[6]["loss"] < steps[1]["loss"]
    state = torch.load(checkpoint.latest(str(tmp_path)), weights_only=True)["optimizer"]["state"]
    assert "row_var" in state[0] or "variance" in state[0]  # Adafactor's factored second moments


def test_save_per_epoch_and_step_cadence(tmp_path):
    # a corpus of ~2.5k train tokens: at 4 x 64 = 256 tokens a step, the train data wraps after about 10 steps
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [6], "fineweb-edu-dedup": [6]}, seed=2, words=(150, 250))
    run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "data", "--val-docs", 1, "--workers", 1)
    steps_per_epoch = count_tokens(tmp_path / "data") / 256
    assert 6 < steps_per_epoch < 14
    args = TINY + ["--batch_size=4", "--train_tokens=4096", "--eval_interval=0", "--save_strategy=epoch",
                   "--log_interval=4", "--step_cadence=0.5", "--log_checksums=False"]
    train(tmp_path / "out", tmp_path / "data", *args)
    saved = [int(Path(p).name[5:13]) for p in checkpoint.all_checkpoints(str(tmp_path / "out"))]
    assert len(saved) == 2 and saved[0] == math.ceil(steps_per_epoch) and saved[1] == 16, saved  # epoch end, run end
    assert [s["epoch"] for s in checkpoint.load(checkpoint.latest(str(tmp_path / "out")))["data_states"]] == [1]
    assert sorted(records(tmp_path / "out")) == list(range(2, 17, 2))  # log_interval 4 x step_cadence 0.5


def test_resume_refusals(base2, prepared_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(base2 / "ckpt-00000004.pt", out)
    # a different model
    proc = train(out, prepared_data, *BASE2, "--d_model=64", ok=False)
    assert_one_clear_error(proc, "holds a different model", "d_model: checkpoint 32, this run 64", "--init_from=scratch")
    # a different world size while restoring the per-rank data positions
    proc = train(out, prepared_data, *BASE2, ok=False)
    assert_one_clear_error(proc, "written by 2 ranks and this run has 1", "--restore_data_state=False")
    # ... which goes on with the weights, optimizer and schedule when the data streams may start afresh; settings that
    # leave the weights alone may change too: block_size (RoPE, no learned positions) and loss_chunk_size
    proc = train(out, prepared_data, *BASE2, "--restore_data_state=False", "--max_steps=5", "--block_size=32",
                 "--loss_chunk_size=50")
    assert "resuming from" in proc.stdout and sorted(records(out)) == [5]
    assert records(out)[5]["tokens"] == 4 * 512 + 128  # 1 rank and 32-token blocks now: a quarter of the tokens per step
    assert checkpoint.load(checkpoint.latest(str(out)))["model_config"]["block_size"] == 32
    # resume asked for, nothing to resume; scratch asked for, checkpoints of another run in the way
    proc = train(tmp_path / "empty", prepared_data, *BASE2, "--init_from=resume", ok=False)
    assert_one_clear_error(proc, "init_from='resume' but", "has no checkpoint")
    proc = train(out, prepared_data, *BASE2, "--init_from=scratch", ok=False)
    assert_one_clear_error(proc, "init_from='scratch' but", "already holds checkpoints", "Use another --out_dir")


def test_config_errors_and_dry_run(prepared_data, tmp_path):
    proc = run(["--device=cpu", "--batchsize=4"])
    assert_one_clear_error(proc, "unknown key 'batchsize'", "did you mean batch_size")
    # (the other configurator errors are in test_configurator.py; train.py passes them through the same way)
    proc = run(["--device=cpu", "--init_from=latest"])
    assert_one_clear_error(proc, "init_from='latest'", "is not one of 'scratch', 'resume', 'auto'")
    proc = run(["--device=cpu", f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}"])
    assert_one_clear_error(proc, "no prepared data in")
    fake = tmp_path / "fake_site" / "wandb"  # make sure `import wandb` fails, installed or not
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    proc = run([f"--data_dir={prepared_data}", f"--out_dir={tmp_path / 'out'}", *BASE2, "--wandb_log=True"], env={**os.environ, "PYTHONPATH": str(fake.parent)})
    assert_one_clear_error(proc, "wandb_log=True but wandb is not installed")
    proc = run([f"--data_dir={prepared_data}", *BASE2, "--dry_run=True", f"--out_dir={tmp_path / 'dry'}"])
    assert proc.returncode == 0, proc.stderr
    for line in ("  grad_accum = 2", "  lr = 0.003", "parameters", "world size 1 on cpu",
                 "tokens per step: 2 seqs x 64 tokens x grad_accum 2 x 1 ranks = 256",
                 "lr: 0.003 x sqrt(4) = 6.000e-03 peak", "muon_lr: 0.007 x sqrt(4) = 1.400e-02 peak",
                 "constant, then a linear decay over the last 50% to 4,096 tokens = 16 steps",
                 "train documents drawn in proportion to the documents left"):
        assert line in proc.stdout, f"{line!r} not in\n{proc.stdout}"
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    # the mixture is checked against the prepared subsets before anything runs, and shown in the plan
    proc = run([f"--data_dir={prepared_data}", *BASE2, "--dry_run=True", "--mixture=fineweb-edu-dedup:3,cosmopedia:1"])
    assert_one_clear_error(proc, "mixture='fineweb-edu-dedup:3,cosmopedia:1': no subset 'cosmopedia'",
                           "it has: cosmopedia-v2, fineweb-edu-dedup")
    proc = run([f"--data_dir={prepared_data}", *BASE2, "--dry_run=True", "--mixture=fineweb-edu-dedup:3,cosmopedia-v2:1"])
    assert "train documents drawn cosmopedia-v2 0.25, fineweb-edu-dedup 0.75" in proc.stdout, proc.stdout


def test_sample_prints_text(base2):
    proc = run([f"--out_dir={base2}", "--device=cpu", "--start=The water", "--num_samples=2", "--max_new_tokens=8"], script="sample.py")
    assert proc.returncode == 0, proc.stderr
    assert "ckpt-00000008.pt: step 8" in proc.stderr
    samples = proc.stdout.split("---------------\n")
    assert samples[-1] == "" and len(samples) == 3, proc.stdout
    for sample in samples[:2]:  # sample.py prints the prompt itself: the text after it is what the model wrote
        assert sample.startswith("The water") and len(sample.rstrip("\n")) > len("The water") + 8, proc.stdout
    proc = run([f"--out_dir={base2}", "--device=cpu", "--max_new_tokens=4", "--temperature=0"], script="sample.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("---------------\n")[0].strip(), "greedy sampling from a fresh document wrote nothing"
    proc = run(["--out_dir=/nonexistent/run", "--device=cpu"], script="sample.py")
    assert_one_clear_error(proc, "no checkpoint (ckpt-*.pt) in /nonexistent/run")


def test_sample_errors(base2, prepared_data, tmp_path):
    proc = run([f"--ckpt_path={base2 / 'ckpt-00000099.pt'}", "--device=cpu"], script="sample.py")
    assert_one_clear_error(proc, f"--ckpt_path={base2 / 'ckpt-00000099.pt'} does not exist; the newest checkpoint "
                                 f"there is {base2 / 'ckpt-00000008.pt'}")
    assert "Move it away" not in proc.stdout + proc.stderr
    proc = run([f"--out_dir={base2}", "--device=cpu", f"--start=FILE:{tmp_path / 'missing.txt'}"], script="sample.py")
    assert_one_clear_error(proc, f"cannot read the prompt file of --start=FILE:{tmp_path / 'missing.txt'} "
                                 f"(No such file or directory)")
    proc = run([f"--out_dir={base2}", "--device=cpu"], script="sample.py", env=offline_env(tmp_path))
    assert_one_clear_error(proc, "tiktoken could not load the r50k_base tokenizer", "must download it once",
                           "set TIKTOKEN_CACHE_DIR")
    # train.py with samples during training loads the tokenizer at start: offline, it stops before any step
    proc = train(tmp_path / "offline", prepared_data, *TINY, "--batch_size=2", "--sample_interval=1", ok=False,
                 env=offline_env(tmp_path))
    assert_one_clear_error(proc, "sample_interval=1 needs the tokenizer", "must download it once", "TIKTOKEN_CACHE_DIR")
    assert "step 1" not in proc.stdout and not (tmp_path / "offline" / "log.jsonl").exists()


def test_sample_and_export_name_a_checkpoint_this_model_py_cannot_hold(base2, prepared_data, tmp_path):
    """sample.py and export.py load checkpoints through checkpoint.load_model: a setting or a weight this model.py
    does not have, or a backend this machine cannot run, is one line naming the file (was a traceback in sample.py);
    train.py names the weights too (its message said only "Error(s) in loading state_dict")."""
    ckpt = torch.load(base2 / "ckpt-00000008.pt", weights_only=True)
    unknown = {**ckpt, "model_config": {**ckpt["model_config"], "n_expert": 8}}
    renamed = {**ckpt, "model": {k.replace("ffn.up", "ffn.upp"): v for k, v in ckpt["model"].items()}}
    for name, bad, fragments in [("unknown", unknown, ["model settings this model.py does not know (n_expert)"]),
                                 ("renamed", renamed, ["does not fit this model.py", "ffn.up"])]:
        path = checkpoint.save(bad, str(tmp_path / name), 8, keep_last=1)
        for script, args in [("sample.py", ["--device=cpu"]), ("tools.export", [f"--to={tmp_path / 'hf'}"])]:
            proc = run([f"--ckpt_path={path}", *args], script=script)
            assert_one_clear_error(proc, str(path), *fragments)
    # train.py resuming from it: the same one line
    proc = run([f"--data_dir={prepared_data}", f"--out_dir={tmp_path / 'renamed'}", *BASE2, "--restore_data_state=False"])
    assert_one_clear_error(proc, "does not fit this model.py", "no weights for layers.0.ffn.up.weight",
                           "no place for: layers.0.ffn.upp.weight", "--init_from=scratch")
    proc = run([f"--out_dir={base2}", "--device=cpu", "--attn_impl=flash_attention_2"], script="sample.py")
    assert_one_clear_error(proc, "cannot build the model of checkpoint", "flash_attention_2", "CUDA")
    proc = run([f"--out_dir={base2}", "--device=cpu", "--attn_impl=flash"], script="sample.py")
    assert_one_clear_error(proc, "attn_impl", "flash_attention_2")


def test_smoke_preset_saves_often_enough_to_show_resume():
    smoke = runpy.run_path(str(ROOT / "config" / "smoke.py"))
    steps = math.ceil(smoke["train_tokens"] / (smoke["batch_size"] * smoke["block_size"]))
    assert steps >= 4 * smoke["save_interval"], "killing a smoke run must leave checkpoints to resume from"


def test_a_save_longer_than_the_collective_timeout_does_not_kill_the_run(prepared_data, tmp_path):
    # Rank 0 is frozen in the middle of writing a checkpoint (as on a stalled filesystem) for twice the process
    # group's timeout; rank 1 waits for it in the gloo save barrier (save_timeout_s), not in the next step's all-reduce.
    out = tmp_path / "run"
    args = TINY + ["--batch_size=2", "--train_tokens=10000000", "--eval_interval=0", "--save_interval=1",
                   "--max_steps=12", "--log_checksums=False", "--dist_timeout_s=3"]
    proc = start(out, prepared_data, *args, ranks=2)
    try:
        wait_for(lambda: len(checkpoint.all_checkpoints(str(out))) >= 1, 60, proc, "a first checkpoint")
        rank0 = worker_pids(proc.pid)[0]
        for attempt in range(200):
            wait_for(lambda: any(out.glob("*.pt.tmp")), 30, proc, "a checkpoint being written")
            os.kill(rank0, signal.SIGSTOP)
            if any(out.glob("*.pt.tmp")):
                break
            os.kill(rank0, signal.SIGCONT)
        frozen_at = list(out.glob("*.pt.tmp"))
        time.sleep(6)
        os.kill(rank0, signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = output(out)
    assert len(frozen_at) == 1, "rank 0 was not stopped mid-save"
    assert proc.returncode == 0, text[-3000:]
    assert checkpoint.latest(str(out)).endswith("ckpt-00000012.pt") and sorted(records(out)) == list(range(1, 13))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(out_dir, data, *args, nodes=2):
    """`nodes` torchrun agents of one rank each, meeting at a c10d rendezvous on the loopback address, as on nodes
    sharing out_dir and data_dir. Each agent's output goes to out_dir/../node<i>.txt."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(nodes):
        with open(Path(out_dir).parent / f"node{i}.txt", "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                 "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=smoltrain-test", "train.py",
                 f"--data_dir={data}", f"--out_dir={out_dir}", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                # torchrun sets OMP_NUM_THREADS=1 only for several ranks per node, and the one-node reference has
                # two: one thread here too, since a CPU matmul's bits can depend on its thread count (MKL on Intel)
                env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return procs


def wait_nodes(procs, out_dir, timeout=90):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    texts = [(Path(out_dir).parent / f"node{i}.txt").read_text() for i in range(len(procs))]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-3000:]
    return "\n".join(texts)


def test_two_nodes_equal_one_node_with_stop_and_resume(base2, prepared_data, tmp_path):
    out = tmp_path / "run"
    procs = start_nodes(out, prepared_data, *BASE2)
    try:  # preempt rank 1 (on whichever node the rendezvous put it): both nodes stop after the same step, rank 0 saves
        wait_for(lambda: logged_steps(out) >= 2, 60, procs[0], "2 logged steps")
        ranks = {r: pid for p in procs for r, pid in worker_pids(p.pid).items()}
        os.kill(ranks[1], signal.SIGTERM)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    text = wait_nodes(procs, out)
    assert "stopping on a signal on another rank after step" in text
    stopped = max(records(out))
    assert 2 <= stopped < 8 and checkpoint.latest(str(out)).endswith(f"ckpt-{stopped:08d}.pt")
    # the same command again resumes on both nodes and ends where the one-node run ended, bit for bit
    text = wait_nodes(start_nodes(out, prepared_data, *BASE2), out)
    assert f"resuming from {out / f'ckpt-{stopped:08d}.pt'}: step {stopped}" in text
    base, lines = records(base2), [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))  # one writer: every step logged once
    for s, r in records(out).items():
        for key in ("loss", "param_checksum", "batch_checksum", "lr"):
            assert r[key] == base[s][key], f"step {s}: {key} {r[key]} != {base[s][key]} of the one-node run"
    assert val_scores(out) == val_scores(base2)
    saved = [int(Path(p).name[5:13]) for p in checkpoint.all_checkpoints(str(out))]
    assert saved == sorted({stopped, 4, 8}) and not list(out.glob("*.tmp"))


def test_nodes_that_do_not_share_out_dir_are_refused(base2, prepared_data, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(base2 / "ckpt-00000004.pt", tmp_path / "a")
    endpoint, procs = f"127.0.0.1:{free_port()}", []
    for node, out in enumerate(["a", "b"]):  # node 0 has a checkpoint in its out_dir, node 1 an empty one
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={endpoint}", "--rdzv_id=smoltrain-test", "train.py", f"--data_dir={prepared_data}",
             f"--out_dir={tmp_path / out}", *BASE2], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        texts = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs)
    assert "the ranks see different checkpoints" in "".join(texts) and "ckpt-00000004.pt" in "".join(texts)
    assert "one directory shared by all of them" in "".join(texts)
    assert not (tmp_path / "b" / "log.jsonl").exists() and not (tmp_path / "a" / "log.jsonl").exists()


# -----------------------------------------------------------------------------------------------------------------
# GPU runs: train.py with the CUDA defaults (device cuda, bfloat16 autocast, flex_attention, torch.compile, nccl).
# GPU kernels are not bitwise deterministic, so a resume is compared to an uninterrupted run within rounding.
needs_cuda = cuda_only("needs a CUDA GPU; this machine has none")
needs_2_gpus = cuda_only("needs 2 CUDA GPUs for 2 NCCL ranks", gpus=2)
GPU_TINY = [a for a in TINY if not a.startswith(("--device=", "--dtype=", "--compile="))] + ["--block_size=128"]


@needs_cuda
def test_batches_reach_the_gpu_through_pinned_memory_without_blocking(monkeypatch):
    """data.to_device, which the local loaders and dispatch_batches both use: a pinned source and a non_blocking
    copy (from pageable memory every copy is a stream sync: world_size of them per micro-step on rank 0)."""
    from data import to_device
    copies = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        copies.append((self.is_pinned(), kwargs.get("non_blocking", False)))
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = to_device(torch.arange(10), "cuda:0")
    assert out.is_cuda and copies == [(True, True)]
    assert to_device(torch.arange(3), "cpu").device.type == "cpu"


@needs_cuda
def test_one_gpu_with_cuda_defaults_trains_and_resumes(prepared_data, tmp_path):
    args = GPU_TINY + ["--batch_size=4", "--train_tokens=3072", "--warmup_tokens=512", "--eval_interval=3",
                       "--save_interval=100"]  # 512 tokens a step: 6 steps
    train(tmp_path / "a", prepared_data, *args, timeout=600)
    run = records(tmp_path / "a", "run")[0]["run"]  # what train.py resolved 'auto' to on this machine
    assert (run["world_size"], run["device"], run["parallel"], run["dtype"], run["compile"], run["attn_impl"]) == (
        1, "cuda:0", None, "bfloat16", True, "flex_attention")
    train(tmp_path / "b", prepared_data, *args, "--max_steps=3", timeout=600)
    ckpt = checkpoint.load(checkpoint.latest(str(tmp_path / "b")))
    assert isinstance(ckpt["rng_states"][0]["cuda"], torch.Tensor)  # the CUDA generator's state is saved too
    proc = train(tmp_path / "b", prepared_data, *args, timeout=600)
    assert "resuming from" in proc.stdout and "step 3" in proc.stdout
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a[6]["loss"] < a[1]["loss"] - 0.5
    for s in range(1, 7):  # the same batches and weights; only rounding differs (bf16, non-deterministic kernels)
        assert a[s]["batch_checksum"] == b[s]["batch_checksum"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=0.02), f"step {s}"
    assert records(tmp_path / "b", "val_loss/cosmopedia-v2")[6]["val_loss/cosmopedia-v2"] == pytest.approx(
        records(tmp_path / "a", "val_loss/cosmopedia-v2")[6]["val_loss/cosmopedia-v2"], abs=0.02)


@needs_2_gpus
def test_two_gpus_keep_identical_weights_stop_and_resume(prepared_data, tmp_path):
    args = GPU_TINY + ["--batch_size=2", "--grad_accum=2", "--train_tokens=8192", "--warmup_tokens=1024",
                       "--eval_interval=4", "--save_interval=4"]  # 2 ranks x 2 x 2 x 128 = 1024 tokens a step: 8 steps
    train(tmp_path, prepared_data, *args, "--max_steps=4", ranks=2, timeout=600)
    run = records(tmp_path, "run")[0]["run"]
    assert (run["world_size"], run["device"], run["parallel"], run["backend"]) == (2, "cuda:0", "ddp", "nccl")
    proc = train(tmp_path, prepared_data, *args, "--dispatch_batches=True", ranks=2, timeout=600)
    assert "resuming from" in proc.stdout and "step 4" in proc.stdout
    steps = records(tmp_path)
    assert sorted(steps) == list(range(1, 9)) and steps[8]["loss"] < steps[1]["loss"] - 0.5
    for s, r in steps.items():
        assert r["param_checksum"][0] == r["param_checksum"][1], f"the ranks' weights differ after step {s}"
        assert r["batch_checksum"][0] != r["batch_checksum"][1]
    assert checkpoint.latest(str(tmp_path)).endswith("ckpt-00000008.pt")
    assert sorted(records(tmp_path, "val_loss/cosmopedia-v2")) == [4, 8]
