"""Resource exhaustion, tried as a user meets it (--device=cpu): a disk that fills up at a checkpoint save (a real
tmpfs of a few MB, mounted in a user namespace; /dev/full for the unit), partial files a killed save left, a step that
runs out of memory (the allocator's error injected into the real step), and the best checkpoint by name."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoint
from conftest import ROOT
from test_train import BASE2, TINY, assert_one_clear_error, command, records, train


def test_a_save_to_a_full_disk_removes_its_partial_file_and_keeps_the_earlier_ones(tmp_path):
    """checkpoint.save into a file that answers every write with ENOSPC (/dev/full, as a full disk does): a SaveError
    whose message gives the bytes needed and free and the ways out, no .tmp left, the earlier checkpoint intact."""
    state = {"model": {"w": torch.randn(1000, 100)}, "step": 1}
    first = checkpoint.save(state, str(tmp_path), 1, keep_last=3)
    os.symlink("/dev/full", tmp_path / "ckpt-00000002.pt.tmp")
    with pytest.raises(checkpoint.SaveError) as failed:
        checkpoint.save({**state, "step": 2}, str(tmp_path), 2, keep_last=3)
    message = str(failed.value)
    for fragment in (f"no space left on the device for checkpoint {tmp_path / 'ckpt-00000002.pt'}",
                     "it needs about 0.4 MB", "free", "--out_dir", "--keep_last=3",
                     f"rerun the same command: it resumes from {first}"):
        assert fragment in message, message
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]
    assert torch.equal(checkpoint.load(first)["model"]["w"], state["model"]["w"])


def can_mount_tmpfs(tmp_path):
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def on_small_disk(tmp_path, size, script):
    """Run the shell script in a mount namespace where $DISK is a fresh tmpfs of `size` bytes (`remount BYTES`
    grows it: space freed); its outputs go to files outside the namespace."""
    disk = tmp_path / "disk"
    disk.mkdir()
    full = textwrap.dedent(f"""\
        set -u
        DISK={disk}
        remount() {{ mount -o remount,size=$1 $DISK; }}
        mount -t tmpfs -o size={size} tmpfs $DISK
        cd {ROOT}
        """) + textwrap.dedent(script)
    return subprocess.run(["unshare", "-Urm", "bash", "-c", full], capture_output=True, text=True, timeout=600), disk


SAVES = ["--batch_size=2", "--train_tokens=1024", "--warmup_tokens=256", "--save_interval=4", "--eval_interval=0"]


def test_a_run_that_fills_its_disk_stops_cleanly_and_resumes_bit_exactly(tmp_path, prepared_data):
    """train.py with out_dir on a tmpfs that holds one checkpoint and a half: the start warns that keep_last + 1
    checkpoints do not fit; the save at step 8 stops the run with the message (exit 1, no traceback, no .tmp left),
    the checkpoint of step 4 still loads; after the disk grows, the same command removes a stale .tmp (as a kill
    mid-save leaves) and resumes from step 4 to the weights of an uninterrupted run, bit for bit."""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -Urm): no small disk to fill")
    ref = tmp_path / "ref"
    train(ref, prepared_data, *TINY, *SAVES)
    size = os.path.getsize(ref / "ckpt-00000004.pt")
    args = " ".join([f"--data_dir={prepared_data}", "--out_dir=$DISK/run", *TINY, *SAVES])
    out = tmp_path / "out"
    out.mkdir()
    proc, _ = on_small_disk(tmp_path, int(1.5 * size), f"""\
        {sys.executable} train.py {args} > {out}/first.txt 2>&1; echo $? > {out}/first.rc
        ls $DISK/run > {out}/first.ls
        {sys.executable} -c "import checkpoint; checkpoint.load('$DISK/run/ckpt-00000004.pt')" > {out}/load.txt 2>&1
        echo $? > {out}/load.rc
        remount {10 * size}
        echo partial > $DISK/run/ckpt-00000006.pt.tmp
        {sys.executable} train.py {args} > {out}/second.txt 2>&1; echo $? > {out}/second.rc
        ls $DISK/run > {out}/second.ls
        cp $DISK/run/log.jsonl {out}/log.jsonl
        """)
    assert proc.returncode == 0, proc.stderr
    first = (out / "first.txt").read_text()
    assert (out / "first.rc").read_text().strip() == "1" and "Traceback" not in first, first[-3000:]
    assert "warning: the disk holding" in first and "up to 4 are there at once (keep_last=3" in first, first[-3000:]
    assert "no space left on the device for checkpoint" in first and "ckpt-00000008.pt" in first
    assert "--keep_last=3" in first and "it resumes from" in first and "ckpt-00000004.pt" in first
    assert (out / "first.ls").read_text().split() == ["ckpt-00000004.pt", "log.jsonl"]
    assert (out / "load.rc").read_text().strip() == "0", (out / "load.txt").read_text()
    second = (out / "second.txt").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second[-3000:]
    assert "ckpt-00000006.pt.tmp: a partial checkpoint that an interrupted save left" in second
    assert "resuming from" in second and "step 4" in second
    assert "ckpt-00000006.pt.tmp" not in (out / "second.ls").read_text()
    resumed = {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}
    assert resumed[8]["param_checksum"] == records(ref)[8]["param_checksum"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_stop_together_when_the_disk_fills(tmp_path, prepared_data, parallel):
    """Under torchrun (2 gloo ranks, DDP and FSDP2), rank 0's failed save stops both ranks with the message: none
    waits in a collective for a rank that is gone."""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -Urm): no small disk to fill")
    ref = tmp_path / "ref"
    train(ref, prepared_data, *BASE2, "--max_steps=4")  # one process: the size of a checkpoint of this model
    size = os.path.getsize(ref / "ckpt-00000004.pt")
    args = " ".join([f"--data_dir={prepared_data}", "--out_dir=$DISK/run", *BASE2, f"--parallel={parallel}"])
    out = tmp_path / "out"
    out.mkdir()
    launch = " ".join(command(2))
    proc, _ = on_small_disk(tmp_path, int(1.5 * size), f"""\
        timeout 300 {launch} {args} > {out}/run.txt 2>&1; echo $? > {out}/run.rc
        ls $DISK/run > {out}/run.ls
        """)
    assert proc.returncode == 0, proc.stderr
    text = (out / "run.txt").read_text()
    assert (out / "run.rc").read_text().strip() not in ("0", "124"), text[-3000:]  # 124: timeout, a hung rank
    assert text.count("no space left on the device for checkpoint") >= 1 and "ckpt-00000008.pt" in text, text[-3000:]
    assert (out / "run.ls").read_text().split() == ["ckpt-00000004.pt", "log.jsonl"]


INJECT_OOM = """\
import os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository, as for python train.py
import torch, optim
calls = [0]
real_step = optim.Muon.step
def step(self, *args, **kwargs):  # the third optimizer step runs out of memory, as a CUDA allocation would
    calls[0] += 1
    if calls[0] == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                     "of 79.10 GiB of which 1.20 GiB is free.")
    return real_step(self, *args, **kwargs)
optim.Muon.step = step
sys.argv = sys.argv[1:]
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_out_of_memory_in_a_step_is_one_message_and_saves_nothing(tmp_path, prepared_data):
    """An out-of-memory error raised in step 3 of train.py (and in bench.py's step) ends the run with one message:
    the step, the device's memory, the peak memory_estimate.py predicts, the keys that shrink it with this run's
    values; exit 1, no traceback, no checkpoint of step 3 (the one of step 2 stays)."""
    (tmp_path / "inject.py").write_text(INJECT_OOM)
    args = [f"--data_dir={prepared_data}", f"--out_dir={tmp_path / 'run'}", *TINY, "--batch_size=2",
            "--train_tokens=1024", "--warmup_tokens=256", "--save_interval=2", "--eval_interval=0"]
    proc = subprocess.run([sys.executable, str(tmp_path / "inject.py"), "train.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert_one_clear_error(proc, "train.py: out of memory in step 3 on this machine's RAM (",
                           "memory_estimate.py predicts a peak of", "--batch_size=1 --grad_accum=2 (the same tokens",
                           "--activation_checkpointing=all", "--param_dtype=bfloat16", "--parallel=fsdp",
                           f"the last checkpoint is {tmp_path / 'run/ckpt-00000002.pt'}")
    assert sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("ckpt")) == ["ckpt-00000002.pt"]
    proc = subprocess.run([sys.executable, str(tmp_path / "inject.py"), "tools.bench", *TINY, "--dtype=bfloat16", "--batch_size=4",
                           "--param_dtype=bfloat16", "--activation_checkpointing=all", "--steps=3", "--warmup=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_clear_error(proc, "bench.py: out of memory in a step of 4x64 on this machine's RAM",
                           "--batch_size=2 --grad_accum=2", "--parallel=fsdp")
    assert "--param_dtype=bfloat16" not in proc.stderr and "--activation_checkpointing=all" not in proc.stderr


def test_best_without_keep_best_is_one_message(tmp_path, prepared_data):
    """'best' of a run that kept none (no keep_best): sample.py says so and how to get one. (With keep_best it
    resolves: tests/test_recipe.py's keep_best test.)"""
    train(tmp_path, prepared_data, *TINY, "--batch_size=2", "--max_steps=1", "--eval_interval=0")
    proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}", "--ckpt_path=best", "--device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_clear_error(proc, f"the run in {tmp_path} recorded no best checkpoint", "--keep_best=True",
                           "ckpt-00000001.pt")
