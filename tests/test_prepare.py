"""prepare.py against real parquet files, real tokenization and real shards on disk; the hub download through a
local server laid out like the hub (tests/fake_hub.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken

from fake_hub import FakeHub
from conftest import ROOT, make_text, offline_env, run_prepare, write_hub_layout, write_subset_file

EOT = 50256


def decode_shard(directory, name):
    enc = tiktoken.get_encoding("r50k_base")
    tokens = np.fromfile(directory / f"{name}.bin", dtype=np.uint16)
    offsets = np.fromfile(directory / f"{name}.idx", dtype=np.int64)
    docs = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(d[0] == EOT and EOT not in d[1:] for d in docs)  # every document opens with <|endoftext|>
    return [enc.decode(d[1:].tolist()) for d in docs]


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- prepare.py

def test_prepare_roundtrip_meta_and_skipped_texts(tmp_path):
    texts = write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [30, 25], "fineweb-edu-dedup": [40]}, seed=3)
    # null and empty texts are skipped and counted, never crash the run
    with_gaps = texts["fineweb-edu-dedup/train-00000-of-00001.parquet"][:]
    with_gaps[3], with_gaps[17], with_gaps[30] = None, "", None
    write_subset_file(tmp_path / "hub/fineweb-edu-dedup/train-00000-of-00001.parquet", "fineweb-edu-dedup", with_gaps)
    # the default --val-docs 1000 would take the whole of these small files: val takes 10% of a first file instead
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "out", "--workers", 2)
    warnings = [line for line in proc.stderr.split("\n") if "warning" in line]
    assert warnings == [  # each on a line of its own, not inside the progress line
        "[prepare] warning: cosmopedia-v2/train-00000-of-00002.parquet has 30 rows: val takes 3 documents (at most 10% "
        "of a subset's first file), not --val-docs 1000",
        "[prepare] warning: fineweb-edu-dedup/train-00000-of-00001.parquet has 40 rows: val takes 4 documents (at "
        "most 10% of a subset's first file), not --val-docs 1000"], proc.stderr

    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("r50k_base", 50257, EOT, "uint16")
    for subset, files in (("cosmopedia-v2", 2), ("fineweb-edu-dedup", 1)):
        originals = [t for i in range(files) for t in texts[f"{subset}/train-{i:05d}-of-{files:05d}.parquet"]]
        if subset == "fineweb-edu-dedup":
            originals = [t for t in with_gaps if t]
        stored = decode_shard(out / subset, "val") + [d for i in range(files)
                                                      for d in decode_shard(out / subset, f"train-{i:05d}")]
        assert stored == originals  # decode(shard document i) == original text i, val first, in file order
        info = meta["subsets"][subset]
        assert info["val"]["docs"] == {"cosmopedia-v2": 3, "fineweb-edu-dedup": 4}[subset] and info["files"] == files
        assert [sh["source"] for sh in info["shards"]] == [f"{subset}/train-{i:05d}-of-{files:05d}.parquet"
                                                          for i in range(files)]
        for sh in info["shards"]:
            assert sh["tokens"] == (out / subset / f"{sh['name']}.bin").stat().st_size // 2
    assert meta["subsets"]["fineweb-edu-dedup"]["shards"][0]["skipped_docs"] == 3
    assert meta["subsets"]["fineweb-edu-dedup"]["shards"][0]["docs"] == 40 - 3 - 4


def test_fraction_takes_first_files_per_subset(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [5, 5, 5], "fineweb-edu-dedup": [5, 5]})
    run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "out", "--fraction", 0.5, "--val-docs", 1)
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert [sh["source"] for sh in meta["subsets"]["cosmopedia-v2"]["shards"]] == [
        "cosmopedia-v2/train-00000-of-00003.parquet", "cosmopedia-v2/train-00001-of-00003.parquet"]  # ceil(1.5)
    assert len(meta["subsets"]["fineweb-edu-dedup"]["shards"]) == 1


def process_state(pid):
    """The state letter of /proc/<pid>/stat ('R', 'S', 'T' stopped, 'Z' zombie), or None once the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def freeze_when(proc, condition, timeout=60):
    """SIGSTOP proc at a moment when condition() holds, checked again once the process is really stopped: nothing
    can change between that check and whatever the caller does next (no race with a rename on a busy machine)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "prepare.py finished before it could be stopped; make the fixture bigger"
        assert time.time() < deadline, "timed out waiting for the moment to stop prepare.py"
        if condition():
            proc.send_signal(signal.SIGSTOP)
            while process_state(proc.pid) not in ("T", "t"):  # kill() returns before the process has stopped
                time.sleep(0.001)
            if condition():
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)


def test_kill_during_prepare_then_rerun_gives_identical_bytes(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [300, 300], "fineweb-edu-dedup": [300, 300]}, seed=5,
                     words=(200, 600))
    run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "clean", "--val-docs", 10, "--workers", 1)
    for kill_at in ("first .tmp file", "second shard"):
        out = tmp_path / f"killed-{kill_at[0]}"
        proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--source", str(tmp_path / "hub"),
                                 "--out", str(out), "--val-docs", "10", "--workers", "1"], cwd=ROOT,
                                stderr=subprocess.DEVNULL)
        if kill_at == "first .tmp file":
            freeze_when(proc, lambda: list(out.rglob("*.tmp")))
        else:
            freeze_when(proc, lambda: len(list(out.rglob("train-*.bin"))) >= 2 and list(out.rglob("*.tmp")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list(out.rglob("*.tmp")), "the kill should land while a shard is being written"
        run_prepare("--source", tmp_path / "hub", "--out", out, "--val-docs", 10, "--workers", 1)
        assert tree_bytes(out) == tree_bytes(tmp_path / "clean")  # no .tmp left, every byte the same


def test_a_deleted_shard_is_redone_by_a_rerun(tmp_path):
    """What the corrupt-shard messages advise: delete the shard (and its .idx), rerun prepare.py the same way."""
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [30, 30], "fineweb-edu-dedup": [30]}, seed=8)
    args = ("--source", tmp_path / "hub", "--out", tmp_path / "out", "--val-docs", 3, "--workers", 1)
    run_prepare(*args)
    clean = tree_bytes(tmp_path / "out")
    for name in ("cosmopedia-v2/train-00001", "fineweb-edu-dedup/val"):
        for ext in (".bin", ".idx"):
            (tmp_path / "out" / f"{name}{ext}").unlink()
        proc = run_prepare(*args)
        assert "1 to do" in proc.stderr and tree_bytes(tmp_path / "out") == clean


def descendants(pid):
    """Every process below pid. Threads and processes come and go while /proc is read: one gone meanwhile is skipped."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in map(int, children):
            found += [child] + descendants(child)
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_prepare_takes_its_workers_with_it(tmp_path, sig):
    """A pipeline around prepare.py (here: pytest reading its stdout and stderr) ends when prepare.py is killed:
    no worker outlives it holding the pipes open."""
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [200], "fineweb-edu-dedup": [200]}, seed=6, words=(200, 600))
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--source", str(tmp_path / "hub"),
                             "--out", str(tmp_path / "out"), "--val-docs", "0", "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # stopped while both workers exist and a shard is being written, so they hold tokenizing work
        freeze_when(proc, lambda: len(descendants(proc.pid)) >= 2 and list((tmp_path / "out").rglob("*.tmp")))
        workers = descendants(proc.pid)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=30)  # EOF on both pipes: every process holding them has exited
    finally:
        proc.kill()
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143), stderr
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM; rerun the same command to resume" in stderr and "Traceback" not in stderr
    deadline = time.time() + 10
    while any(process_state(w) not in (None, "Z") for w in workers) and time.time() < deadline:
        time.sleep(0.01)
    assert [w for w in workers if process_state(w) not in (None, "Z")] == [], "a worker outlived prepare.py"


@pytest.fixture
def busy_machine():
    """Two processes spinning on the CPU beside the test, as on a loaded machine: prepare.py's main thread is then
    preempted anywhere, so a signal lands inside library code (concurrent.futures, print, a rename) too."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def start_prepare(*args):
    """prepare.py in the background -> (process, its stderr lines so far, reader thread, event set at its first
    line). The thread drains stderr, so the pipe never fills and blocks prepare.py; it ends at EOF, once prepare.py
    and every worker (they inherit stderr) have exited."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, first_line = [], threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line)
            first_line.set()
        first_line.set()
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return proc, lines, reader, first_line


def half_renamed_shards(out):
    """Shards with their .bin in place but not their .idx, or the other way round."""
    stems = {p.with_suffix("") for ext in ("bin", "idx") for p in Path(out).glob(f"*/*.{ext}")}
    return [str(s) for s in sorted(stems) if s.with_suffix(".bin").exists() != s.with_suffix(".idx").exists()]


def test_sigterm_and_sigint_stop_prepare_cleanly_at_any_point(tmp_path, busy_machine):
    """SIGTERM (docker stop, systemd, Slurm) and SIGINT (Ctrl-C), sent to prepare.py running or suspended (Ctrl-Z,
    then bash's `kill %1`: SIGSTOP, the signal, SIGCONT), at many points of its work on a loaded machine: it exits
    at once with 128 + the signal, one message and no traceback, takes its workers with it, leaves no shard
    half-renamed, and a rerun finishes the job byte for byte."""
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [500, 500], "fineweb-edu-dedup": [500, 500]}, seed=9,
                     words=(200, 600))
    args = ["--source", tmp_path / "hub", "--val-docs", 10, "--workers", 2]
    proc, lines, reader, first_line = start_prepare(*args, "--out", tmp_path / "clean")
    try:
        assert first_line.wait(60)
        start = time.time()
        returncode = proc.wait(120)
        work_s = time.time() - start  # from the first stderr line (printed once the signal handlers are set) to the end
    finally:
        proc.kill()
    reader.join(10)
    assert returncode == 0, "".join(lines)
    cases = [(sig, suspended) for sig in (signal.SIGTERM, signal.SIGINT) for suspended in (False, True)]
    points = 4  # per case, interleaved: together 16 points spread over the first 75% of the work
    stopped = []
    for k in range(points * len(cases)):
        sig, suspended = cases[k % len(cases)]
        delay = 0.75 * work_s * (k + 0.5) / (points * len(cases))
        name = f"{sig.name}{' (suspended)' if suspended else ''} {delay:.2f} s into the work"
        out = tmp_path / f"stopped-{k}"
        proc, lines, reader, first_line = start_prepare(*args, "--out", out)
        try:
            assert first_line.wait(60)
            time.sleep(delay)
            workers = descendants(proc.pid)
            if suspended:
                proc.send_signal(signal.SIGSTOP)
                while process_state(proc.pid) not in ("T", "t", "Z", None):
                    time.sleep(0.001)
            proc.send_signal(sig)
            if suspended:
                proc.send_signal(signal.SIGCONT)
            reader.join(60)  # a loaded machine is slow, but the stop itself should take well under a second
            assert not reader.is_alive(), f"{name}: prepare.py or a worker still runs 60 s later:\n{''.join(lines)}"
            returncode = proc.wait(10)
        finally:
            proc.kill()
            proc.wait()
        stderr = "".join(lines)
        assert "Traceback" not in stderr and stderr.count("stopped by") <= 1, f"{name}:\n{stderr}"
        if "[prepare] done" in stderr:
            # the signal came after the work (the machine busier than for the clean run): exit 0, or stopped on the
            # way out, by the handler or, once the exiting interpreter has reset it, by the signal itself
            assert returncode in (0, 128 + sig, -sig), f"{name}: exit status {returncode}\n{stderr}"
        else:
            message = f"prepare.py: stopped by {sig.name}; rerun the same command to resume"
            assert returncode == 128 + sig and message in stderr, f"{name}: exit status {returncode}\n{stderr}"
            stopped.append(out)
        deadline = time.time() + 10
        while any(process_state(w) not in (None, "Z") for w in workers) and time.time() < deadline:
            time.sleep(0.01)
        assert [w for w in workers if process_state(w) not in (None, "Z")] == [], f"{name}: a worker outlived it"
        assert half_renamed_shards(out) == [], name
        if (out / "meta.json").exists():  # every shard it lists is on disk
            meta = json.loads((out / "meta.json").read_text())
            assert all((out / s / f"{sh['name']}{ext}").exists() for s in meta["subsets"]
                       for sh in meta["subsets"][s]["shards"] for ext in (".bin", ".idx")), name
    assert len(stopped) >= 8, f"only {len(stopped)} runs were still working when signalled; make the fixture bigger"
    # a rerun of one stopped in the middle of a shard, with earlier shards finished, gives the uninterrupted output
    middle = [o for o in stopped if (o / "meta.json").exists() and list(o.rglob("*.tmp"))] or stopped[-1:]
    run_prepare(*args, "--out", middle[0])
    assert tree_bytes(middle[0]) == tree_bytes(tmp_path / "clean")


def test_prepare_input_errors(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [4], "fineweb-edu-dedup": [4]})
    # a missing subset folder, then an empty one
    hub2 = tmp_path / "hub2"
    write_hub_layout(hub2, {"cosmopedia-v2": [4]})
    both = ["--subsets", "cosmopedia-v2,fineweb-edu-dedup"]
    proc = run_prepare("--source", hub2, "--out", tmp_path / "o1", *both, check=False)
    assert proc.returncode == 1 and "fineweb-edu-dedup" in proc.stderr and "no train-*.parquet" in proc.stderr
    # without --subsets, a local copy holding one subset only (like smollm-sample) is prepared with a warning
    proc = run_prepare("--source", hub2, "--out", tmp_path / "one", "--val-docs", 1)
    assert "preparing without fineweb-edu-dedup" in proc.stderr
    assert list(json.loads((tmp_path / "one/meta.json").read_text())["subsets"]) == ["cosmopedia-v2"]
    (hub2 / "fineweb-edu-dedup").mkdir()
    proc = run_prepare("--source", hub2, "--out", tmp_path / "o1", check=False)
    assert proc.returncode == 1 and "missing or empty folder" in proc.stderr and "Traceback" not in proc.stderr
    # a file without a text column
    import pyarrow as pa
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "hub/fineweb-edu-dedup/train-00000-of-00001.parquet")
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "o2", check=False)
    assert proc.returncode == 1 and "no 'text' column" in proc.stderr and "content" in proc.stderr
    # a file that is not parquet at all (a truncated download, say)
    (tmp_path / "hub/fineweb-edu-dedup/train-00000-of-00001.parquet").write_bytes(b"not parquet")
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "o4", check=False)
    assert proc.returncode == 1 and "not a readable parquet file" in proc.stderr and "Traceback" not in proc.stderr
    # a source dir that doesn't exist, an unknown subset, a bad fraction
    for args, words in ((["--source", tmp_path / "nope"], "no such directory"),
                        (["--source", tmp_path / "hub", "--subsets", "python-edu"], "unknown subset"),
                        (["--source", tmp_path / "hub", "--fraction", 0], "--fraction")):
        proc = run_prepare(*args, "--out", tmp_path / "o3", check=False)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr


def test_no_space_left_is_a_clear_error(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [4], "fineweb-edu-dedup": [4]})
    (tmp_path / "out/cosmopedia-v2").mkdir(parents=True)
    # /dev/full answers every write with ENOSPC, exactly like a full disk
    os.symlink("/dev/full", tmp_path / "out/cosmopedia-v2/train-00000.bin.tmp")
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "out", "--val-docs", 0, check=False)
    assert proc.returncode == 1 and "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert f"(writing {tmp_path / 'out/cosmopedia-v2/train-00000.bin.tmp'})" in proc.stderr, proc.stderr


def test_prepare_fsyncs_the_directory_after_each_rename(tmp_path, monkeypatch):
    """A rename is durable only once its directory is fsynced (else a power cut can undo it): every os.replace of
    a shard or of meta.json is followed at once by an fsync of the directory it renamed into."""
    import prepare
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [5, 5], "fineweb-edu-dedup": [5]})
    events, real_replace, real_fsync = [], os.replace, os.fsync

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", os.path.dirname(os.path.realpath(dst)), os.path.basename(dst)))

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    prepare.prepare(str(tmp_path / "hub"), str(tmp_path / "out"), list(prepare.SUBSETS), 1.0, 2, 1, False,
                    prepare.REVISION)
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    # meta.json after each of the 3 files; .bin and .idx of 3 train shards and 2 val shards
    assert [events[i][2] for i in renames].count("meta.json") == 3 and len(renames) == 3 + 2 * 5
    for i in renames:
        assert events[i + 1] == ("fsync", events[i][1]), f"{events[i]} is not followed by an fsync of its directory"


def test_token_ids_that_do_not_fit_uint16_are_refused():
    import prepare
    base = tiktoken.get_encoding("r50k_base")
    # a real tiktoken encoding whose ids are shifted past 2^16, as a larger vocabulary would produce
    shifted = tiktoken.Encoding(name="shifted", pat_str=base._pat_str,
                                mergeable_ranks={k: v + 20000 for k, v in base._mergeable_ranks.items()},
                                special_tokens={"<|endoftext|>": 70257})
    with pytest.raises(prepare.PrepareError, match="does not fit uint16"):
        prepare.tokenize_texts(["Hello world, this is a test."], encoding=shifted)
    tokens, lengths, skipped = prepare.tokenize_texts(["Hello world", None, ""])
    assert tokens.tolist() == [EOT, 15496, 995] and lengths.tolist() == [3] and skipped == 2


# ----------------------------------------------------------------------------- the hub download path

def test_download_from_hub_matches_local_source_and_resumes(tmp_path, fake_hub):
    hub, env = fake_hub
    # huggingface_hub writes downloads in 10 MB chunks, so make one file big enough to be cut past the first:
    # long prompts (a column prepare.py never reads) of incompressible bytes
    big = "cosmopedia-v2/train-00001-of-00002.parquet"
    texts = pq.read_table(hub / big, columns=["text"]).column(0).to_pylist()
    rng = random.Random(0)
    write_subset_file(hub / big, "cosmopedia-v2", texts, prompts=[rng.randbytes(300_000).hex() for _ in texts])
    assert (hub / big).stat().st_size > 15e6
    FakeHub.cut_first_get = {big}
    run_prepare("--out", tmp_path / "from_hub", "--val-docs", 5, "--workers", 1, env=env)
    run_prepare("--source", hub, "--out", tmp_path / "from_dir", "--val-docs", 5, "--workers", 1)
    shards = lambda root: {k: v for k, v in tree_bytes(root).items() if k.endswith((".bin", ".idx"))}
    assert shards(tmp_path / "from_hub") == shards(tmp_path / "from_dir") and len(shards(tmp_path / "from_dir")) == 10
    # the cut download was resumed with a Range request from where it stopped
    ranged = [r for r in FakeHub.requests if r[0] == "GET" and "train-00001-of-00002" in r[1] and r[2]]
    assert ranged and ranged[0][2].startswith("bytes=") and not ranged[0][2].startswith("bytes=0-")
    # downloaded parquet files are deleted once tokenized, unless --keep-parquet
    assert not list((tmp_path / "from_hub").rglob("*.parquet"))
    meta = json.loads((tmp_path / "from_hub/meta.json").read_text())
    assert meta["source"] == "HuggingFaceTB/smollm-corpus" and meta["revision"] == "3ba9d605774198c5868892d7a8deda78031a781f"
    assert any("/resolve/3ba9d605774198c5868892d7a8deda78031a781f/" in r[1] for r in FakeHub.requests)
    run_prepare("--out", tmp_path / "kept", "--val-docs", 5, "--keep-parquet", "--fraction", 0.5, env=env)
    assert len(list((tmp_path / "kept").rglob("*.parquet"))) == 2


def shard_docs(out, subset, name):
    """[token list of each document] of one prepared shard."""
    tokens = np.fromfile(out / subset / f"{name}.bin", dtype=np.uint16)
    offsets = np.fromfile(out / subset / f"{name}.idx", dtype=np.int64)
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_docs_reads_a_small_part_of_each_file_and_the_first_documents(tmp_path, fake_hub):
    """--docs N from the hub reads the footer and the row groups of the first N documents of each subset, by range
    requests: a small part of each file, nothing downloaded whole; the shards hold exactly those documents' tokens
    (what a full prepare makes of them), across a file boundary too; a kill -9 mid-read and a rerun give the bytes of
    an uninterrupted run."""
    hub, env = fake_hub
    rng = random.Random(3)
    # 12 + 8 cosmopedia documents span two files; columns prepare.py never reads make every file megabytes
    for rel, n in (("cosmopedia-v2/train-00000-of-00002.parquet", 12), ("cosmopedia-v2/train-00001-of-00002.parquet", 300),
                   ("fineweb-edu-dedup/train-00000-of-00001.parquet", 300)):
        texts = [make_text(rng, rng.randint(20, 200)) for _ in range(n)]
        filler = [rng.randbytes(2_500_000 // n).hex() for _ in texts]
        subset = rel.split("/")[0]
        write_subset_file(hub / rel, subset, texts, **({"prompts": filler} if subset == "cosmopedia-v2" else {"ids": filler}))
    sizes = {str(p.relative_to(hub)): p.stat().st_size for p in hub.rglob("*.parquet")}
    assert min(sizes.values()) > 2e6

    run_prepare("--docs", 20, "--val-docs", 2, "--workers", 1, "--out", tmp_path / "sample", env=env)
    big = [rel for rel in sizes if not rel.startswith("cosmopedia-v2/train-00000")]
    for rel in big:
        assert FakeHub.served[rel] < sizes[rel] / 4, (rel, FakeHub.served[rel], sizes[rel])
    assert not list((tmp_path / "sample").rglob("*.parquet"))  # nothing downloaded whole
    assert not any(r[2] is None for r in FakeHub.requests if r[0] == "GET" and "/resolve/" in r[1])

    run_prepare("--source", hub, "--val-docs", 2, "--workers", 1, "--out", tmp_path / "full")
    sample, full = tmp_path / "sample", tmp_path / "full"
    meta = json.loads((sample / "meta.json").read_text())
    assert meta["docs"] == 20
    for subset in ("cosmopedia-v2", "fineweb-edu-dedup"):  # val (first file's first docs) then train, in file order
        ours = shard_docs(sample, subset, "val")
        theirs = shard_docs(full, subset, "val")
        for sh in meta["subsets"][subset]["shards"]:
            ours += shard_docs(sample, subset, sh["name"])
            theirs += shard_docs(full, subset, sh["name"])[:sh["docs"]]
        assert len(ours) == 20 and ours == theirs[:20]
    assert [sh["docs"] for sh in meta["subsets"]["cosmopedia-v2"]["shards"]] == [11, 8]  # 1 of 12 went to val

    # kill -9 while the fineweb shard is half written (its range requests held), then rerun the same command
    killed = tmp_path / "killed"
    FakeHub.hold_when = lambda: bool(list((killed / "fineweb-edu-dedup").glob("*.tmp")))
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--docs", "20", "--val-docs", "2",
                             "--workers", "1", "--out", str(killed)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    assert FakeHub.holding.wait(timeout=120), "prepare.py never read the fineweb file"
    proc.kill()
    proc.wait()
    FakeHub.hold_when = None
    assert list(killed.rglob("*.tmp"))
    run_prepare("--docs", 20, "--val-docs", 2, "--workers", 1, "--out", killed, env=env)
    assert tree_bytes(killed) == tree_bytes(sample)


def test_docs_errors(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [30], "fineweb-edu-dedup": [30]}, seed=3)
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "a", "--docs", 10, "--fraction", 0.5, check=False)
    assert proc.returncode == 1 and "--docs 10 and --fraction 0.5" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "a", "--docs", 0, check=False)
    assert proc.returncode == 1 and "--docs 0: must be >= 1" in proc.stderr
    run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "a", "--docs", 10)
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "a", "--docs", 12, check=False)
    assert proc.returncode == 1 and "docs=10" in proc.stderr and "this run has 12" in proc.stderr


def test_unreachable_hub_says_how_to_use_source(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    proc = run_prepare("--out", tmp_path / "out", env=env, check=False, timeout=120)
    assert proc.returncode == 1 and "--source DIR" in proc.stderr and "Traceback" not in proc.stderr
    # at once, without huggingface_hub's ~24 s of retries (which log "Retrying in Ns")
    assert "cannot reach the Hugging Face Hub" in proc.stderr and "Retrying" not in proc.stderr, proc.stderr


def test_offline_without_a_tokenizer_cache_says_what_to_do(tmp_path):
    write_hub_layout(tmp_path / "hub", {"cosmopedia-v2": [3], "fineweb-edu-dedup": [3]})
    proc = run_prepare("--source", tmp_path / "hub", "--out", tmp_path / "out", env=offline_env(tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    for words in ("prepare.py: error: tiktoken could not load the r50k_base tokenizer", "must download it once",
                  "r50k_base.tiktoken", "set TIKTOKEN_CACHE_DIR"):
        assert words in proc.stderr, proc.stderr
