"""tools/gpu_check.py, the one command a lent GPU runs: on a CPU its dry run resolves every step (each config, key and
path, by the step's own --dry_run or --collect-only), writes the report, and goes on past a failing step."""
import json
import subprocess
import sys

import pytest

from tools import gpu_check
from conftest import ROOT


def test_the_plan_puts_the_telling_figures_first_and_fits_its_budget(tmp_path):
    """The plan (no --only): the default model with the default recipe and AdamW first, then the GPT-2-small shape
    (and nanoGPT's model when given), the profile, the 1.7B, train and resume, the CUDA tests last; the steps before
    the tests are limited to the 8-minute budget less the tests' 108 s measured on an H200."""
    all_steps = gpu_check.steps("data", tmp_path, nanogpt="model.py")
    plan = [s for s in all_steps if s[0] in gpu_check.PLAN]
    assert [s[0] for s in plan] == list(gpu_check.PLAN) and plan[-1][0] == "tests"
    assert "--optimizer=muon,adamw" in plan[0][1] and "config/deepone.py" in plan[0][1]
    assert sum(s[2] for s in plan[:-1]) <= 2 * (480 - 108), "limits are ~1.5-2 x the expected times"
    assert "nanoGPT accum 8" not in [s[0] for s in gpu_check.steps("data", tmp_path)]
    assert all("--compile=False" in s[1] for s in plan if s[0].startswith(("train", "resume")))


def test_dry_run_resolves_every_step_and_writes_the_report(tmp_path, prepared_data):
    reference = tmp_path / "model.py"
    reference.write_text("# stands in for nanoGPT's model.py: a dry run checks the path only\n")
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry_run", "--only=all",
                           f"--data_dir={prepared_data}", f"--nanogpt={reference}", f"--out={tmp_path / 'report'}",
                           f"--work={tmp_path / 'work'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report/gpu_check.json").read_text())
    names = [s[0] for s in gpu_check.steps(prepared_data, tmp_path / "work", nanogpt=str(reference))]
    assert [r["step"] for r in report["steps"]] == names and all(r["ok"] for r in report["steps"])
    assert "dry run" in report["header"] and "nanoGPT side by side: not run" not in report["header"]
    bench_steps = [r for r in report["steps"] if r["command"].startswith("python -m tools.bench")]
    assert len(bench_steps) >= 12 and all(r["records"] and r["records"][0]["dry_run"] for r in bench_steps)
    tests = next(r for r in report["steps"] if r["step"] == "tests")
    assert "12/" in tests["tail"] or "collected" in tests["tail"]
    md = (tmp_path / "report/gpu_check.md").read_text()
    assert all(f"| {n} | yes |" in md for n in names)
    assert not (tmp_path / "work").exists()  # a dry run trains nothing


def test_a_failing_step_is_reported_and_the_check_goes_on(tmp_path, prepared_data, monkeypatch):
    good = [sys.executable, "-m", "tools.bench", "--json=True", "config/smoke.py"]
    monkeypatch.setattr(gpu_check, "steps", lambda data_dir, work, nanogpt: [
        ("typo", [*good, "--n_layerz=2"], 60, None), ("fine", good, 60, None)])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--dry_run", "--only=all", f"--data_dir={prepared_data}", f"--out={tmp_path}"])
    assert stop.value.code == 1
    typo, fine = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert not typo["ok"] and typo["rc"] == 1 and "n_layerz" in typo["tail"] and fine["ok"]
    assert "NO (1)" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_argument_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "tools.gpu_check", *args], cwd=ROOT, capture_output=True, text=True)
    proc = run("--dry_run", "--only=nosuch", f"--data_dir={tmp_path}")
    assert proc.returncode == 2 and "no step named nosuch" in proc.stderr and "backends" in proc.stderr
    proc = run("--dry_run", f"--data_dir={tmp_path / 'missing'}")
    assert proc.returncode == 2 and "python prepare.py --docs 2000 --out" in proc.stderr
    if not __import__("torch").cuda.is_available():
        proc = run("--only=backends")
        assert proc.returncode == 2 and "no CUDA GPU; --dry_run" in proc.stderr
