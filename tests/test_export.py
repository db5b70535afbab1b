"""After training: export.py to transformers (per family, logits and greedy tokens equal smoltrain's), the GPT-2
tokenizer against tiktoken, lm-evaluation-harness on an exported model, plot.py, and train.py's sample_interval.

The checkpoints are written by train.py itself (3 steps of a tiny model on the CPU, a high LR so that every norm
gain moves away from 1 and a swapped or dropped weight would show in the logits)."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from conftest import ROOT
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers", reason="pip install -r requirements-extras.txt (CI installs it)")
tiktoken = pytest.importorskip("tiktoken")

EOT = 50256
FAMILIES = {  # each a different export path: Llama class, Qwen3 class (tied, rope_theta), trust_remote_code
    "llama": ["--family=llama", "--n_kv_head=2"],
    "qwen3": ["--family=qwen3", "--n_kv_head=2", "--tie_embeddings=True", "--rope_theta=500000.0"],
    "deepone": ["--family=deepone", "--eval_interval=3", "--eval_iters=1", "--sample_interval=3",
                "--logit_softcap=2.0", "--ffn=relu2", "--value_embeds=True", "--x0_mixing=True", "--smear=True",
                "--window_pattern=SL", "--short_window=8"],  # options transformers lacks: exported through model.py
}
TINY = ["--device=cpu", "--n_layer=2", "--n_head=4", "--d_model=32", "--block_size=64", "--batch_size=2",
        "--compile=False", "--dtype=float32", "--max_steps=3", "--train_tokens=4096", "--warmup_tokens=128",
        "--lr=1e-2", "--log_interval=1", "--eval_interval=0"]
PARAGRAPHS = [
    "Photosynthesis is the process by which green plants turn light into chemical energy.",
    "It's 3.14159 -- don't we've I'll; naïve café, Ünïcödé 日本語 and an emoji 😀!\n\n\tTabbed line\r\n",
    "   leading spaces, inner    runs of   spaces, trailing spaces and newlines   \n\n\n",
    "def f(x):\n    return x ** 2  # code, with symbols: {}[]<>@#$%^&*_+=|\\/~`\n" * 2,
]


def run(script, *args, env=None, timeout=180):
    """Run a core script (train.py, ...) or a tool as a module (tools.bench, ...) from the repository's root."""
    command = [sys.executable, script] if script.endswith(".py") else [sys.executable, "-m", script]
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """family -> out_dir of a 3-step train.py run."""
    out = {}
    for family, args in FAMILIES.items():
        out_dir = tmp_path_factory.mktemp(f"run-{family}")
        proc = run("train.py", f"--data_dir={prepared_data}", f"--out_dir={out_dir}", *TINY, *args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out[family] = out_dir
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """family -> transformers folder, written by export.export (which checks its own logits, check=True)."""
    from tools import export
    folders = {}
    for family, out_dir in runs.items():
        to = tmp_path_factory.mktemp("hf") / family
        arch, path, step, diff = export.export(out_dir=str(out_dir), to=str(to))
        assert arch == {"llama": "llama", "qwen3": "qwen3", "deepone": "remote_code"}[family]
        assert step == 3 and diff <= 1e-4
        folders[family] = to
    return folders


def smoltrain_model(out_dir):
    ckpt = checkpoint.load(checkpoint.latest(out_dir))
    model = Transformer(ModelConfig(**{**ckpt["model_config"], "attn_impl": "sdpa"}))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def hf_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def packed_batch(enc):
    """Two rows of 64 tokens packed as data.PackedLoader packs them: documents opening with <|endoftext|>,
    concatenated, cut at the row's end; doc_ids number the documents of each row."""
    texts = ["The river carries water from the mountain to the ocean.", "Stars shine.",
             "A teacher explains how the cell measures light, and the students write it down in a book.",
             "Music and history.", "The village garden grows green plants near the ancient forest, where animals"
             " move quietly between the large trees and the bright sun warms every leaf."]
    rows, doc_rows = [], []
    for order in (texts, texts[::-1]):
        tokens, docs = [], []
        for d, text in enumerate(order):
            ids = [EOT] + enc.encode_ordinary(text)
            tokens += ids
            docs += [d] * len(ids)
        rows.append(tokens[:64])
        doc_rows.append(docs[:64])
    return torch.tensor(rows), torch.tensor(doc_rows)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_exported_logits_and_greedy_tokens_equal_smoltrain(family, runs, exported):
    enc = tiktoken.get_encoding("r50k_base")
    ours, theirs = smoltrain_model(runs[family]), hf_model(exported[family])
    x, doc_ids = packed_batch(enc)
    assert (doc_ids.max(dim=1).values >= 2).all()  # several documents in each row
    # whole rows, plain causal
    assert (ours(x)[0] - theirs(x).logits).abs().max() <= 1e-4
    # a packed batch (smoltrain's document mask) equals its documents fed one by one to transformers
    packed = ours(x, doc_ids=doc_ids)[0]
    n_docs = 0
    for b in range(x.size(0)):
        for d in doc_ids[b].unique():
            span = (doc_ids[b] == d).nonzero().flatten()
            s, e = span[0].item(), span[-1].item() + 1
            assert (packed[b, s:e] - theirs(x[b:b + 1, s:e]).logits[0]).abs().max() <= 1e-4, (b, d)
            n_docs += 1
    assert n_docs >= 6
    # greedy generation, 20 tokens, with transformers' generate() (its KV cache for Llama and Qwen3)
    idx = torch.tensor([[EOT] + enc.encode_ordinary("The water")])
    want = ours.generate(idx, 20, temperature=0)
    got = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=EOT)
    assert got.tolist() == want.tolist()
    if family == "qwen3":  # tied head stays tied; the RoPE base is carried over
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
        config = theirs.config
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 0))
        assert theta == 500000.0
    if family == "deepone":
        # what transformers checks before running a remote-code folder from the hub: every package its files import
        from transformers.dynamic_module_utils import check_imports
        for name in ("modeling_smoltrain.py", "model.py"):
            check_imports(str(exported[family] / name))
        # left padding (as generate() and lm-eval batch prompts): real tokens ignore the pads
        pad = torch.tensor([[EOT] * 5 + x[0, :20].tolist(), x[1, :25].tolist()])
        mask = torch.tensor([[0] * 5 + [1] * 20, [1] * 25])
        logits = theirs(pad, attention_mask=mask).logits
        assert (logits[0, 5:] - ours(x[:1, :20])[0][0]).abs().max() <= 1e-4
        assert (logits[1] - ours(x[1:, :25])[0][0]).abs().max() <= 1e-4


def test_a_model_option_transformers_lacks_exports_through_model_py():
    """logit_softcap has no Llama/Qwen3 equivalent: auto exports through model.py, --target=transformers refuses."""
    from tools import export
    capped = ModelConfig(family="llama", logit_softcap=15.0)
    assert export.pick_architecture(capped, "auto") == "remote_code"
    with pytest.raises(export.ExportError, match=r"model settings \['logit_softcap'\] have no transformers"):
        export.pick_architecture(capped, "transformers")


def test_tokenizer_matches_tiktoken(exported):
    from transformers import AutoTokenizer
    enc = tiktoken.get_encoding("r50k_base")
    tok = AutoTokenizer.from_pretrained(exported["llama"])
    for text in PARAGRAPHS:
        ids = enc.encode_ordinary(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == EOT and len(tok) == 50257
    assert tok("a<|endoftext|>b")["input_ids"] == enc.encode("a<|endoftext|>b", allowed_special="all")
    # the published GPT-2 files, byte for byte: merges.txt is vocab.bpe and vocab.json is encoder.json
    from tools import export
    vocab, merges = export.gpt2_vocab_and_merges()
    assert len(merges) == 50000 and merges[0] == "Ġ t" and vocab["Ġthe"] == 262 and vocab["!"] == 0


def test_export_command_and_refusals(runs, tmp_path):
    proc = run("tools.export", f"--out_dir={runs['llama']}", f"--to={tmp_path / 'cli'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as LlamaForCausalLM" in proc.stdout and "checked: transformers' fp32 logits match" in proc.stdout
    assert "lm_eval --model hf --model_args pretrained=" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "cli"))
    proc = run("tools.export", f"--out_dir={tmp_path / 'nothing'}", f"--to={tmp_path / 'a'}")
    assert proc.returncode == 1 and "export.py: no checkpoint (ckpt-*.pt) in" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    from tools import export  # the other refusals in-process: each is the same SystemExit with one message
    for kwargs, message in [
        ({"out_dir": str(runs["deepone"]), "to": str(tmp_path / "b"), "target": "transformers"},
         "deepone's post-norm DeepNet layers (x = norm(alpha x + f(x)), ReLU-GLU) have no transformers class"),
        ({"out_dir": str(runs["llama"]), "to": str(tmp_path / "cli")}, "exists and is not empty"),
        ({"out_dir": str(runs["llama"])}, "say where to write: --to=hf/run"),
        ({"ckpt_path": str(tmp_path / "ckpt-00000001.pt"), "to": str(tmp_path / "c")}, "does not exist"),
    ]:
        with pytest.raises(SystemExit, match="^export.py: ") as refusal:
            export.export(**kwargs)
        assert message in str(refusal.value)
    assert not (tmp_path / "b").exists()
    # the class follows the layer, not the family's name: q/k norm makes a Qwen3 layer
    for family, qk_norm, arch in [("llama", None, "llama"), ("llama", True, "qwen3"), ("qwen3", None, "qwen3"),
                                  ("qwen3", False, "llama"), ("deepone", None, "remote_code")]:
        config = ModelConfig(family=family, n_layer=2, n_head=2, d_model=32, qk_norm=qk_norm)
        assert export.pick_architecture(config, "auto") == arch
        assert export.pick_architecture(config, "remote_code") == "remote_code"


def test_lm_eval_harness_scores_every_document(runs, exported, tmp_path):
    """lm-eval's own CLI with --model hf (its HFLM) on the trust_remote_code export, on a local multiple-choice task;
    every document gets an accuracy, and the harness's log-likelihoods equal smoltrain's own."""
    pytest.importorskip("lm_eval", reason="pip install -r requirements-extras.txt (CI installs it)")
    docs = [{"question": "The sun is a", "choices": ["star", "leaf", "river"], "answer": 0},
            {"question": "Plants make sugar from", "choices": ["light", "music"], "answer": 0},
            {"question": "Water flows down the", "choices": ["mountain", "book", "number"], "answer": 0},
            {"question": "A student reads a", "choices": ["book", "carbon"], "answer": 0}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    import downstream
    downstream.write_task(tmp_path, "smoltrain_tiny_mc", tmp_path / "docs.jsonl", "multiple_choice", "{{question}}",
                       "{{answer}}", "{{choices}}", metrics=("acc",))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={exported['deepone']},trust_remote_code=True,add_bos_token=True", "--tasks", "smoltrain_tiny_mc",
         "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "4", "--output_path",
         str(tmp_path / "results"), "--log_samples"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "results/*/results_*.json"))[0]).read_text())
    assert 0.0 <= results["results"]["smoltrain_tiny_mc"]["acc,none"] <= 1.0
    samples = [json.loads(line) for line in Path(glob.glob(str(tmp_path / "results/*/samples_*.jsonl"))[0]).open()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    enc, model = tiktoken.get_encoding("r50k_base"), smoltrain_model(runs["deepone"])
    for s in samples:
        assert s["acc"] in (0.0, 1.0)
        doc = docs[s["doc_id"]]
        for choice, (loglik, _) in zip(doc["choices"], s["filtered_resps"]):
            context = enc.encode_ordinary(doc["question"])
            whole = [EOT] + enc.encode_ordinary(doc["question"] + " " + choice)  # add_bos_token: <|endoftext|> first
            with torch.no_grad():
                logp = model(torch.tensor([whole]))[0][0].log_softmax(-1)
            ours = sum(logp[t - 1, whole[t]].item() for t in range(1 + len(context), len(whole)))
            assert abs(ours - float(loglik)) <= 1e-4, (doc, choice, ours, loglik)


def test_sample_interval_prints_and_logs_continuations(runs):
    out_dir = runs["deepone"]
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [3]
    assert [s["prompt"] for s in samples[0]["samples"]] == ["Photosynthesis is", "The history of the city",
                                                            "To solve the equation"]
    # the logged greedy text is what the step-3 checkpoint generates greedily
    enc, model = tiktoken.get_encoding("r50k_base"), smoltrain_model(out_dir)
    for s in samples[0]["samples"]:
        prompt = [EOT] + enc.encode_ordinary(s["prompt"])
        new = model.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt):].tolist()
        new = new[:new.index(EOT)] if EOT in new else new
        assert s["greedy"] == enc.decode([t for t in new if t < enc.n_vocab])
        assert isinstance(s["sampled"], str)
    # the validation record carries tokens, for plot.py
    assert [r["tokens"] for r in records if "val_loss/cosmopedia-v2" in r] == [3 * 2 * 64]


def test_plot_writes_a_png_of_the_expected_size(runs, tmp_path):
    from PIL import Image
    old = tmp_path / "older-run"  # a second run, as an older train.py logged it: no tokens in validation records
    old.mkdir()
    with open(old / "log.jsonl", "w") as f:
        for step in range(1, 41):
            f.write(json.dumps({"step": step, "loss": 10 - step * 0.1 + 0.3 * (step % 3), "tokens": step * 128}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "val_loss/cosmopedia-v2": 10 - step * 0.08,
                                    "val_loss/fineweb-edu-dedup": 10.2 - step * 0.08}) + "\n")
        f.write('{"step": 41, "loss": 5.')  # cut short by a crash
    png = tmp_path / "curves.png"
    proc = run("tools.plot", runs["deepone"], old, "--out", png)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 450)
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    near = lambda c: any(sum(abs(a - b) for a, b in zip(c, p)) < 12 for p in colours)  # noqa: E731
    assert near((31, 119, 180)) and near((255, 127, 14))  # matplotlib's first two colours: both runs are drawn
    proc = run("tools.plot", tmp_path / "missing")
    assert proc.returncode != 0 and "no log at" in proc.stderr and "Traceback" not in proc.stderr
