"""eval_tasks: lm-evaluation-harness tasks scored on the live model by train.py (downstream.py), against lm-eval's own
HFLM on the exported checkpoint, on 1 and 2 gloo ranks (DDP and FSDP), and its start-up refusals. The tasks are local
YAML + JSON files written here (lm-eval reads them without the hub)."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from contextlib import nullcontext

import pytest

from conftest import ROOT
from test_train import assert_one_clear_error, records, train

lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-extras.txt (CI installs it)")
pytest.importorskip("transformers", reason="pip install -r requirements-extras.txt (CI installs it)")

# llama: its export is transformers' own LlamaForCausalLM, an implementation independent of model.py
TINY = ["--device=cpu", "--family=llama", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--d_model=32",
        "--block_size=64", "--batch_size=2", "--compile=False", "--dtype=float32", "--train_tokens=512",
        "--warmup_tokens=128", "--lr=1e-2", "--log_interval=1", "--eval_interval=0", "--log_checksums=True"]
WORDS = ["star", "leaf", "river", "stone", "cloud", "seed", "book", "light", "music", "water"]


def write_tasks(folder):
    """Two local tasks: a multiple-choice one with 2 to 4 choices per question (so chance differs per example) and
    a perplexity one whose documents are longer than block_size (several rolling windows each)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": f"Question {i}: in the {WORDS[i % 10]} we saw a", "answer": i % 2,
             "choices": [WORDS[(i + k) % 10] + (" again" if k == 1 else "") for k in range(2 + i % 3)]}
            for i in range(24)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    import downstream
    for name, prompt in (("smoltrain_tiny_mc", "{{question}}"), ("smoltrain_tiny_mc2", "Answer: {{question}}")):
        downstream.write_task(folder, name, folder / "mc.jsonl", "multiple_choice", prompt, "{{answer}}", "{{choices}}",
                           tag="smoltrain_tiny_tag")  # both tagged smoltrain_tiny_tag
    texts = [{"text": " ".join(WORDS[(i * 7 + j) % 10] for j in range(40 + 30 * i)) + "."} for i in range(3)]
    (folder / "ppl.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    downstream.write_task(folder, "smoltrain_tiny_ppl", folder / "ppl.jsonl", "loglikelihood_rolling", "", "{{text}}",
                       split="test", metrics=("word_perplexity", "bits_per_byte"))
    downstream.write_task(folder, "smoltrain_tiny_gen", folder / "mc.jsonl", "generate_until", "{{question}}",
                       "{{answer}}", metrics=("exact_match",))
    (folder / "tiny_hub.yaml").write_text(  # data on the hub, never cached here
        "task: smoltrain_tiny_hub\ndataset_path: smoltrain-tests/not-cached\noutput_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return docs


def offline(tmp):
    """The environment of a machine with the tasks' data local and the hub out of reach."""
    return {**os.environ, "HF_HOME": str(tmp / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def scored(prepared_data, tmp_path_factory):
    """Two 4-step runs from the same seed, one scoring both tasks at steps 2 and 4, one without eval_tasks."""
    tmp = tmp_path_factory.mktemp("harness")
    docs = write_tasks(tmp / "tasks")
    with_tasks, without = tmp / "with", tmp / "without"
    proc = train(with_tasks, prepared_data, *TINY, "--eval_tasks=smoltrain_tiny_mc,smoltrain_tiny_ppl",
                 f"--eval_tasks_path={tmp / 'tasks'}", "--eval_tasks_interval=2", env=offline(tmp), timeout=300)
    train(without, prepared_data, *TINY, env=offline(tmp), timeout=300)
    return {"tmp": tmp, "docs": docs, "with": with_tasks, "without": without, "stdout": proc.stdout}


def test_scores_are_logged_with_core_and_leave_training_unchanged(scored):
    scores = records(scored["with"], "core")
    assert sorted(scores) == [2, 4]  # eval_tasks_interval=2, and the end of the schedule
    for r in scores.values():
        assert 0 <= r["task_acc/smoltrain_tiny_mc"] <= 1 and 0 <= r["task_acc_norm/smoltrain_tiny_mc"] <= 1
        assert r["task_word_perplexity/smoltrain_tiny_ppl"] > 1 and r["task_bits_per_byte/smoltrain_tiny_ppl"] > 0
        # core: centered acc_norm of the one task with choices; chance = mean of 1/choices over its examples
        chance = sum(1 / len(d["choices"]) for d in scored["docs"]) / len(scored["docs"])
        assert r["core"] == r["task_centered/smoltrain_tiny_mc"] == pytest.approx(
            (r["task_acc_norm/smoltrain_tiny_mc"] - chance) / (1 - chance))
        assert r["eval_tasks_examples"] == 24 + 3 and r["eval_tasks_s"] > 0 and r["tokens"] == r["step"] * 128
    assert "eval_tasks | smoltrain_tiny_mc acc_norm " in scored["stdout"] and "ms each" in scored["stdout"]
    assert "(centered " in scored["stdout"] and "smoltrain_tiny_ppl word_perplexity " in scored["stdout"]
    assert "batches of 2 x 64" in scored["stdout"]  # progress
    # the same losses, weights and batches at every step as the run without evaluations
    a, b = records(scored["with"]), records(scored["without"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "grad_norm", "param_checksum", "batch_checksum"):
            assert a[step][key] == b[step][key], (step, key)


def test_log_likelihoods_equal_lm_eval_hf_on_the_export(scored):
    """The per-request log-likelihoods of the live model equal lm-eval's HFLM on the exported folder (transformers'
    LlamaForCausalLM) within 1e-4, and so does the accuracy logged at that step."""
    import checkpoint
    from tools import export
    import downstream
    from lm_eval.evaluator import evaluate
    from tokenizer import load_tokenizer
    tmp, ckpt_path = scored["tmp"], checkpoint.latest(scored["with"])
    export.export(ckpt_path=ckpt_path, to=str(tmp / "hf"))
    env = offline(tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tmp / 'hf'},add_bos_token=True,dtype=float32", "--tasks",
         "smoltrain_tiny_mc,smoltrain_tiny_ppl", "--include_path", str(tmp / "tasks"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp / "results"), "--log_samples"],
        cwd=tmp, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hf = {(task, s["doc_id"]): s for task in ("smoltrain_tiny_mc", "smoltrain_tiny_ppl")
          for path in glob.glob(str(tmp / f"results/*/samples_{task}_*.jsonl")) for s in map(json.loads, open(path))}

    model, _ = checkpoint.load_model(ckpt_path, "sdpa")
    lm = downstream.ModelLM(model, load_tokenizer(), 64, 2, "cpu", nullcontext())
    os.environ.update({"HF_HOME": env["HF_HOME"], "HF_DATASETS_OFFLINE": "1"})
    tasks = downstream.load_tasks("smoltrain_tiny_mc,smoltrain_tiny_ppl", str(tmp / "tasks"))
    ours = evaluate(lm, tasks.lm_eval, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    compared = 0
    for task, samples in ours["samples"].items():
        for s in samples:
            other = hf[task, s["doc_id"]]
            for mine, theirs in zip(s["filtered_resps"], other["filtered_resps"], strict=True):
                mine, theirs = (mine, theirs) if task.endswith("ppl") else (mine[0], theirs[0])
                assert abs(float(mine) - float(theirs)) <= 1e-4, (task, s["doc"], mine, theirs)
                compared += 1
    assert compared == sum(2 + i % 3 for i in range(24)) + 3
    results = json.loads(Path(glob.glob(str(tmp / "results/*/results_*.json"))[0]).read_text())["results"]
    logged = records(scored["with"], "core")[4]
    for metric in ("acc", "acc_norm"):
        assert logged[f"task_{metric}/smoltrain_tiny_mc"] == pytest.approx(results["smoltrain_tiny_mc"][f"{metric},none"])
    assert logged["task_word_perplexity/smoltrain_tiny_ppl"] == pytest.approx(
        results["smoltrain_tiny_ppl"]["word_perplexity,none"], rel=1e-4)
    # a tag (or group) stands for its tasks: its centered accuracy is their mean, and core the mean over the names
    tagged = downstream.load_tasks("smoltrain_tiny_tag,smoltrain_tiny_mc", str(tmp / "tasks"))
    assert tagged.leaves == {"smoltrain_tiny_tag": ["smoltrain_tiny_mc", "smoltrain_tiny_mc2"],
                             "smoltrain_tiny_mc": ["smoltrain_tiny_mc"]}
    record = downstream.score(lm, tagged)
    chance = sum(1 / len(d["choices"]) for d in scored["docs"]) / len(scored["docs"])
    centered = {t: (record[f"task_acc_norm/{t}"] - chance) / (1 - chance) for t in tagged.leaves["smoltrain_tiny_tag"]}
    assert record["task_centered/smoltrain_tiny_tag"] == pytest.approx(sum(centered.values()) / 2)
    assert record["core"] == pytest.approx((record["task_centered/smoltrain_tiny_tag"]
                                            + centered["smoltrain_tiny_mc"]) / 2)
    assert record["task_acc_norm/smoltrain_tiny_mc"] == logged["task_acc_norm/smoltrain_tiny_mc"]
    assert record["eval_tasks_examples"] == 2 * 24 and record["eval_tasks_requests"] == 2 * compared - 6



@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_every_attention_backend_scores_alike(scored):
    """The packed rows' document masks under eager and flex_attention (the GPU default; on the CPU its forward
    runs without grads) give sdpa's scores."""
    import checkpoint
    import downstream
    from tokenizer import load_tokenizer
    os.environ.update({"HF_HOME": str(scored["tmp"] / "hf-home"), "HF_DATASETS_OFFLINE": "1"})
    tasks = downstream.load_tasks("smoltrain_tiny_mc,smoltrain_tiny_ppl", str(scored["tmp"] / "tasks"))
    records = {}
    for impl in ("sdpa", "eager", "flex_attention"):
        model, _ = checkpoint.load_model(checkpoint.latest(scored["with"]), impl)
        records[impl] = downstream.score(downstream.ModelLM(model, load_tokenizer(), 64, 2, "cpu", nullcontext()), tasks)
    for impl in ("eager", "flex_attention"):
        for key, value in records["sdpa"].items():
            if key.startswith("task_") or key == "core":
                assert records[impl][key] == pytest.approx(value, rel=1e-5), (impl, key)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_scores_of_one(scored, prepared_data, tmp_path, parallel):
    """From the 1-rank run's final weights, with every LR 0 so that the weights stay as they are: 2 gloo ranks, each
    scoring half of the requests, log the 1-rank run's scores."""
    ckpt = sorted(glob.glob(str(scored["with"] / "ckpt-*.pt")))[-1]
    args = [a for a in TINY if not a.startswith(("--lr=", "--train_tokens="))]
    train(tmp_path / "two", prepared_data, *args, "--lr=0", "--min_lr=0", "--muon_lr=0", "--train_tokens=256",
          f"--init_weights={ckpt}", f"--parallel={parallel}", "--eval_tasks=smoltrain_tiny_mc,smoltrain_tiny_ppl",
          f"--eval_tasks_path={scored['tmp'] / 'tasks'}", ranks=2, env=offline(tmp_path), timeout=300)
    two, one = records(tmp_path / "two", "core")[1], records(scored["with"], "core")[4]
    for key, value in one.items():
        if key.startswith("task_") or key in ("core", "eval_tasks_examples"):
            assert two[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_refusals_come_before_training(prepared_data, tmp_path):
    """Each bad eval_tasks setting stops train.py at start with one message (the hub case in offline mode: with the
    hub merely unreachable, huggingface_hub retries for about 25 s before the same message)."""
    write_tasks(tmp_path / "tasks")
    env = offline(tmp_path)
    stub = tmp_path / "no-lm-eval"
    stub.mkdir()
    (stub / "lm_eval.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\")\n")  # as if absent
    cases = [
        (["--eval_tasks=hellaswagg"], env, ["unknown task hellaswagg (did you mean hellaswag", "lm_eval ls tasks"]),
        (["--eval_tasks=smoltrain_tiny_gen"], env, ["smoltrain_tiny_gen (generate_until)", "lm_eval --model hf"]),
        (["--eval_tasks=smoltrain_tiny_hub"], env, ["the data of smoltrain_tiny_hub could not be loaded",
                                                             "HF_DATASETS_OFFLINE=1"]),
        (["--eval_tasks=smoltrain_tiny_mc"], {**env, "PYTHONPATH": str(stub)},
         ["eval_tasks needs lm-evaluation-harness", "pip install 'lm-eval>=0.4.13'"]),
        (["--eval_tasks=smoltrain_tiny_mc", "--eval_tasks_limit=-1"], env,
         ["eval_tasks_limit=-1", "must be >= 0"]),
    ]
    for i, (args, case_env, fragments) in enumerate(cases):
        out_dir = tmp_path / f"out{i}"
        proc = train(out_dir, prepared_data, *TINY, f"--eval_tasks_path={tmp_path / 'tasks'}", *args, ok=False,
                     env=case_env, timeout=300)
        assert_one_clear_error(proc, "train.py: ", *fragments)
        assert "step 1/" not in proc.stdout and not glob.glob(str(out_dir / "ckpt-*.pt"))


def test_plot_draws_the_task_scores(scored, tmp_path):
    from tools import plot
    from PIL import Image
    assert [r["step"] for r in plot.read_log(str(scored["with"]))[2]] == [2, 4]
    for metric in ("core", "acc_norm"):
        png = tmp_path / f"{metric}.png"
        proc = subprocess.run([sys.executable, "-m", "tools.plot", str(scored["with"]), "--out", str(png), f"--tasks={metric}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert Image.open(png).size == (1200, 450)
