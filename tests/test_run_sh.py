"""run.sh, the README's first commands: the smoke target against a local server laid out like the hub, a local
SOURCE, an unreachable hub, and bad usage. The environment is this interpreter's (VENV=sys.prefix, the torch
installed here), so nothing is downloaded; making a fresh venv is run by hand (see the README)."""
import json
import os
import re
import subprocess
import sys

import torch

from conftest import ROOT, offline_env


def run_sh(*args, env, timeout=600):
    env = {**env, "VENV": sys.prefix, "TORCH": torch.__version__.split("+")[0]}
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


SMOKE_ARGS = ["--device=cpu", "--train_tokens=8192", "--warmup_tokens=2048", "--log_interval=2", "--eval_interval=8",
              "--eval_iters=1", "--save_interval=8"]


def logged_losses(text):
    return [float(x) for x in re.findall(r"loss ([0-9.]+)", text)]


def test_smoke_downloads_a_sample_trains_samples_and_says_what_next(tmp_path, fake_hub):
    hub, env = fake_hub
    from fake_hub import FakeHub
    env = {**env, "DOCS": "30", "DATA": str(tmp_path / "sample"), "OUT": str(tmp_path / "smoke")}
    proc = run_sh("smoke", *SMOKE_ARGS, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    meta = json.loads((tmp_path / "sample/meta.json").read_text())
    assert meta["docs"] == 30 and meta["source"] == "HuggingFaceTB/smollm-corpus"
    assert set(FakeHub.served) and not list((tmp_path / "sample").rglob("*.parquet"))  # ranges, no whole download
    losses = logged_losses(proc.stdout)
    assert len(losses) >= 3 and losses[-1] < losses[0], out[-3000:]
    assert "a sample from the model:" in proc.stderr and "torchrun" in proc.stderr and "prepare.py --fraction" in out
    assert list((tmp_path / "smoke").glob("ckpt-*.pt"))


def test_smoke_with_a_local_source_and_with_no_hub(tmp_path, fake_hub):
    hub, _ = fake_hub
    env = {**os.environ, "SOURCE": str(hub), "DOCS": "30", "DATA": str(tmp_path / "local"), "OUT": str(tmp_path / "o")}
    proc = run_sh("smoke", *SMOKE_ARGS, "--train_tokens=2048", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads((tmp_path / "local/meta.json").read_text())["source"] == "local"

    env = {**offline_env(tmp_path), "DOCS": "30", "DATA": str(tmp_path / "none"), "OUT": str(tmp_path / "n")}
    env["HF_ENDPOINT"] = env["HTTPS_PROXY"]  # a closed port: the hub cannot be reached
    proc = run_sh("smoke", *SMOKE_ARGS, env=env, timeout=120)
    assert proc.returncode == 1 and "cannot reach the Hugging Face Hub" in proc.stderr
    assert "SOURCE=DIR ./run.sh smoke" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "n").exists()  # no training started


def test_run_sh_usage():
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), "train"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "usage: ./run.sh smoke|test|setup" in proc.stderr and "'train'" in proc.stderr
