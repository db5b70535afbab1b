"""Shared test fixtures: small parquet corpora in the published smollm-corpus schemas, and a prepared data dir.

The fixtures write their own data (no ../shared needed), so the suite runs in a fresh clone. Text is
synthetic English-like prose from a seeded word list, tokenized for real by tiktoken's GPT-2 BPE.
"""
import os
import random
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (run.sh test: -n 2) the workers share the cores: each one's torch, and the train.py and
# torchrun processes it starts, get cores / workers threads, so that two workers do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs CUDA GPUs (skipped elsewhere); `pytest -m cuda` selects them all")


def cuda_only(reason, gpus=1):
    """Decorator for a test that needs `gpus` CUDA GPUs: marked `cuda` (gpu_check.py runs them with -m cuda) and
    skipped, with the reason, on a machine with fewer."""
    skip = pytest.mark.skipif(torch.cuda.device_count() < gpus, reason=reason)
    return lambda test: pytest.mark.cuda(skip(test))

# The published column schemas of HuggingFaceTB/smollm-corpus (checked against the 0-row schema files of
# shared/data/smollm-sample/schemas). metadata.date is timestamp[s] on the hub; parquet stores it as [ms].
SCHEMAS = {
    "cosmopedia-v2": pa.schema([
        ("prompt", pa.string()), ("text", pa.string()), ("token_length", pa.int64()),
        ("audience", pa.string()), ("format", pa.string()), ("seed_data", pa.string()),
    ]),
    "fineweb-edu-dedup": pa.schema([
        ("text", pa.string()), ("id", pa.string()),
        ("metadata", pa.struct([
            ("dump", pa.string()), ("url", pa.string()), ("date", pa.timestamp("ms")),
            ("file_path", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
            ("token_count", pa.int64()), ("score", pa.float64()), ("int_score", pa.int64()),
        ])),
    ]),
}

WORDS = ("the of and to in is was for on that with as by at from it an be are this which or have has "
         "water light plant energy cell sun leaf root river mountain city people history music number "
         "teacher student book lesson garden ocean planet star carbon oxygen animal forest village "
         "grows moves makes learns reads writes builds measures changes explains carries shows "
         "small large green bright ancient modern simple careful quiet important natural").split()


def make_text(rng, n_words):
    """Seeded pseudo-English: sentences of 6-14 words, capitalised, ending with a full stop."""
    sentences, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 14))
        words = [rng.choice(WORDS) for _ in range(k)]
        sentences.append(" ".join(words).capitalize() + ".")
        left -= k
    return " ".join(sentences)


def write_subset_file(path, subset, texts, prompts=None, ids=None):
    """One parquet file of `subset`'s schema holding `texts` (None allowed), other columns filled plausibly (or with
    the given prompts / ids, columns that prepare.py never reads)."""
    n = len(texts)
    if subset == "cosmopedia-v2":
        cols = {"prompt": prompts or ["Write a lesson."] * n, "text": texts, "token_length": [len(t or "") // 4 for t in texts],
                "audience": ["students"] * n, "format": ["textbook"] * n, "seed_data": ["fixture"] * n}
    else:
        cols = {"text": texts, "id": ids or [f"<urn:uuid:{i:08d}>" for i in range(n)], "metadata": [None] * n}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small row groups so that readers really stream record batches.
    pq.write_table(pa.table(cols, schema=SCHEMAS[subset]), path, row_group_size=16)


def write_hub_layout(root, docs_per_file=None, seed=0, words=(20, 400)):
    """Write `root/<subset>/train-NNNNN-of-MMMMM.parquet` like the hub repo. Returns {relative path: [texts]}."""
    docs_per_file = docs_per_file or {"cosmopedia-v2": [60, 50], "fineweb-edu-dedup": [90]}
    rng = random.Random(seed)
    written = {}
    for subset, counts in docs_per_file.items():
        for i, n in enumerate(counts):
            texts = [make_text(rng, rng.randint(*words)) for _ in range(n)]
            rel = f"{subset}/train-{i:05d}-of-{len(counts):05d}.parquet"
            write_subset_file(Path(root) / rel, subset, texts)
            written[rel] = texts
    return written


def run_prepare(*args, env=None, check=True, timeout=300):
    """Run prepare.py as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env or os.environ.copy(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prepare.py failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A prepared data dir (both subsets, a few hundred short documents) shared by the whole session."""
    base = tmp_path_factory.mktemp("prepared")
    write_hub_layout(base / "hub", {"cosmopedia-v2": [120, 100], "fineweb-edu-dedup": [110]}, seed=1)
    run_prepare("--source", base / "hub", "--out", base / "data", "--val-docs", 10, "--workers", 1)
    return base / "data"


def offline_env(tmp_path):
    """os.environ with an empty tiktoken cache and every proxy variable pointing at a closed loopback port, so that
    a download fails at once as it does without network (nothing else is replaced)."""
    import socket
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    (Path(tmp_path) / "empty-tiktoken-cache").mkdir(exist_ok=True)
    env.update({"TIKTOKEN_CACHE_DIR": str(Path(tmp_path) / "empty-tiktoken-cache"), "HTTPS_PROXY": proxy,
                "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy, "ALL_PROXY": proxy})
    return env


@pytest.fixture
def fake_hub(tmp_path):
    """(hub dir, environment for prepare.py) with a FakeHub server (tests/fake_hub.py) serving the dir as the hub."""
    from fake_hub import FakeHub, start
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [40, 40], "fineweb-edu-dedup": [50]}, seed=7)
    server, endpoint = start(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    yield tmp_path / "hub", env
    FakeHub.hold_when = None
    server.shutdown()


def packed(B=2, T=256, seed=0, vocab=256):
    """Tokens and doc_ids [B, T] of packed rows for the model tests. Row 0 has document boundaries at 50, 128 and 200
    for T = 256, in proportion for other T (T/2 is on a flex block edge at T = 256, so one whole block is
    cross-document there); the other rows have four at random places."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    doc = torch.zeros(B, T, dtype=torch.long)
    for c in (T * 50 // 256, T // 2, T * 200 // 256):
        doc[0, c:] += 1
    for c in (torch.randperm(T - 1, generator=g)[:4] + 1).tolist():
        doc[1:, c:] += 1
    return idx, doc
