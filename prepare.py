"""Download SmolLM-Corpus and pre-tokenize it into memmapped uint16 token shards.

    python prepare.py                                    # whole corpus from the hub (~672 GB parquet, ~250B tokens)
    python prepare.py --fraction 0.01                    # first 1% of each subset's files (keeps the proportions)
    python prepare.py --docs 2000 --out data/sample      # first 2,000 documents of each subset: megabytes, not GB
    python prepare.py --source /path/to/local/copy       # a local dir laid out like the hub repo

Reads `HuggingFaceTB/smollm-corpus` (subsets cosmopedia-v2 and fineweb-edu-dedup, at a pinned revision),
file by file, or a local directory with the same layout (`<subset>/train-NNNNN-of-MMMMM.parquet`). With --docs N
only the first N documents of each subset are read, from its first file(s): from the hub with HTTP range requests
(the parquet footer, then only the row groups that hold them), so a sample costs megabytes, not whole files.
Writes, under --out (default data/smollm):

    meta.json                          tokenizer, vocab, dtype, and per shard: source file, documents, tokens
    <subset>/train-NNNNN.bin / .idx    one pair per source file: uint16 tokens, int64 document offsets (n_docs + 1)
    <subset>/val.bin / .idx            the first --val-docs documents of the subset's first file (not in train), at
                                       most 10% of that file (VAL_MAX_SHARE), so a small corpus keeps its train data

Each document is stored as [<|endoftext|>] + encode_ordinary(text) with GPT-2's BPE (tiktoken r50k_base), so
every document opens with the end-of-text token. Null and empty texts are skipped and counted.

Crash-safe: every shard is written under a .tmp name, fsynced and renamed when complete (the directory fsynced too, so
a power cut cannot lose the rename), and meta.json is rewritten atomically after each source file; a rerun skips
finished files and redoes an unfinished one, giving output byte-identical to an uninterrupted run. Killed, even by
SIGKILL, prepare.py takes its worker processes with it. SIGTERM and SIGINT (Ctrl-C), to prepare.py running or
suspended, stop it at once with exit status 143 / 130 and a one-line message; a signal that comes while a file's
shards and meta.json are being renamed into place waits until they all are, so they change together.
"""
import argparse
import errno
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import atomic_write
from tokenizer import TOKENIZER, TokenizerError, load_tokenizer

REPO_ID = "HuggingFaceTB/smollm-corpus"
REVISION = "3ba9d605774198c5868892d7a8deda78031a781f"  # pinned, so that a rerun months later reads the same files
# The subsets prepared by default, each with the parquet column that holds its documents' text: a new source laid out
# like the hub (<subset>/train-NNNNN-of-MMMMM.parquet) is one entry here; data.py and train.py read whatever subsets
# meta.json lists, and the mixture key weighs them.
SUBSETS = {"cosmopedia-v2": "text", "fineweb-edu-dedup": "text"}
READ_BATCH_ROWS = 1024   # rows per parquet record batch: bounds memory whatever the file size
TOKENIZE_CHUNK_ROWS = 256  # rows per task sent to a worker process
VAL_MAX_SHARE = 0.1  # val takes at most this share of a subset's first file, so a small corpus keeps its train data
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # docker stop, systemd, Slurm; Ctrl-C
RANGE_BLOCK_BYTES = 1 << 18  # --docs from the hub: the least bytes an HTTP range request fetches


class PrepareError(Exception):
    """A problem with the input or the environment that the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------- tokenization (runs in workers)

_encoding = None


def get_encoding():
    global _encoding
    if _encoding is None:
        try:
            _encoding = load_tokenizer()
        except TokenizerError as e:
            raise PrepareError(str(e)) from None
    return _encoding


def die_with_parent(parent_pid):
    """Worker initializer: the kernel kills this worker when prepare.py dies, even by SIGKILL (Linux
    prctl(PR_SET_PDEATHSIG)), so no worker outlives it, tokenizing for nobody and holding its stdout/stderr open.
    Ctrl-C (sent to the whole process group) is left to the parent, which kills the workers; SIGTERM kills a worker
    outright (fork copied the parent's handler, which is for prepare.py itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG, linux/prctl.h
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM/SIGINT handler still kills the workers
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def tokenize_texts(texts, encoding=None):
    """Tokenize documents -> (uint16 tokens of all kept docs, int64 length of each, number skipped).

    Null and empty texts are skipped. Every kept document is [eot] + encode_ordinary(text)."""
    enc = encoding or get_encoding()
    kept = [t for t in texts if t]
    token_lists = enc.encode_ordinary_batch(kept, num_threads=1)
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for ids, n in zip(token_lists, lengths):
        tokens[pos] = enc.eot_token
        tokens[pos + 1:pos + n] = ids
        pos += n
    if tokens.size and tokens.max() >= 2**16:
        raise PrepareError(f"token id {int(tokens.max())} does not fit uint16 (tokenizer {enc.name}, "
                           f"{enc.n_vocab} tokens); the shard format needs a vocabulary below 65536")
    return tokens.astype(np.uint16), lengths, len(texts) - len(kept)


# ----------------------------------------------------------------------------- listing and fetching source files

def list_source_files(source, subsets, revision, required=True):
    """{subset: [relative paths in file order]} from the hub or a local directory. With required=False (no
    --subsets given), a subset folder that a local directory lacks altogether is skipped with a warning."""
    files = {}
    if source == "hf":
        from huggingface_hub import HfApi
        api = HfApi()
        check_hub_reachable(api.endpoint)
        for subset in subsets:
            try:
                entries = api.list_repo_tree(REPO_ID, path_in_repo=subset, repo_type="dataset", revision=revision)
                files[subset] = sorted(e.path for e in entries
                                       if e.path.rsplit("/", 1)[-1].startswith("train-") and e.path.endswith(".parquet"))
            except Exception as e:  # network errors come in many types (httpx, OSError, HfHubHTTPError)
                raise PrepareError(f"cannot list {REPO_ID}/{subset} on the Hugging Face Hub ({api.endpoint}): "
                                   f"{type(e).__name__}: {e}\nIf the hub is unreachable, download the parquet files "
                                   f"elsewhere and run: python prepare.py --source DIR "
                                   f"(DIR laid out as <subset>/train-NNNNN-of-MMMMM.parquet)") from None
    else:
        root = Path(source)
        if not root.is_dir():
            raise PrepareError(f"--source {source}: no such directory (use --source hf to download from the hub)")
        for subset in subsets:
            if not (root / subset).exists() and not required:
                print(f"[prepare] warning: {root / subset} does not exist; preparing without {subset} "
                      f"(name it in --subsets to make this an error)", file=sys.stderr)
                continue
            files[subset] = sorted(f"{subset}/{p.name}" for p in (root / subset).glob("train-*.parquet"))
        if not files:
            raise PrepareError(f"--source {source}: none of {', '.join(subsets)} is there; expected "
                               f"{source}/<subset>/train-NNNNN-of-MMMMM.parquet")
    for subset, paths in files.items():
        if not paths:
            where = f"{REPO_ID}@{revision}" if source == "hf" else str(Path(source) / subset)
            raise PrepareError(f"subset {subset}: no train-*.parquet files found in {where} "
                               f"(missing or empty folder; expected {subset}/train-NNNNN-of-MMMMM.parquet)")
    return files


def check_hub_reachable(endpoint):
    """One request, no retries, through huggingface_hub's own HTTP session (so proxies count): a hub that cannot be
    reached at all (offline, firewalled, DNS) fails at once with the --source hint, instead of after the ~24 s of
    retries that huggingface_hub spends on every listing call for transient errors."""
    from huggingface_hub.utils import get_session
    try:
        get_session().head(endpoint, timeout=10)
    except Exception as e:  # any HTTP answer, even an error status, means the hub is there; only no answer lands here
        raise PrepareError(f"cannot reach the Hugging Face Hub at {endpoint}: {type(e).__name__}: {e}\n"
                           f"Without hub access, copy the parquet files from elsewhere and run: python prepare.py "
                           f"--source DIR (DIR laid out as <subset>/train-NNNNN-of-MMMMM.parquet)") from None


def fetch(source, rel_path, download_dir, revision):
    """Local path of one source file, downloading it (resumably) from the hub if needed."""
    if source != "hf":
        return Path(source) / rel_path
    from huggingface_hub import hf_hub_download
    try:  # hf_hub_download resumes a partial download from its .incomplete file
        return Path(hf_hub_download(REPO_ID, rel_path, repo_type="dataset", revision=revision, local_dir=download_dir))
    except Exception as e:
        raise PrepareError(f"cannot download {rel_path} from {REPO_ID}@{revision}: {type(e).__name__}: {e}\n"
                           f"Rerun to resume, or use --source DIR with a local copy of the files") from None


def open_remote(rel_path, revision):
    """A read-only file object over one hub file that fetches only the byte ranges read from it (HTTP range requests
    through huggingface_hub's file system), for --docs: pyarrow then reads the footer and the row groups it needs."""
    from huggingface_hub import HfFileSystem
    try:
        return HfFileSystem().open(f"datasets/{REPO_ID}@{revision}/{rel_path}", "rb", block_size=RANGE_BLOCK_BYTES)
    except Exception as e:
        raise PrepareError(f"cannot open {rel_path} in {REPO_ID}@{revision}: {type(e).__name__}: {e}\n"
                           f"Rerun to resume, or use --source DIR with a local copy of the files") from None


def first_docs_files(source, files, docs, revision):
    """--docs: ({subset: [(relative path, rows to read)]}, the fewest first files of each subset that hold `docs`
    rows (null and empty texts count as rows, as a full prepare skips them too), and {relative path: its parquet
    footer}, so that reading the file later does not fetch the footer again). Reads only footers."""
    plan, footers = {}, {}
    for subset, paths in files.items():
        plan[subset], left = [], docs
        for rel in paths:
            with open_source(source, rel, revision) as pf:
                footers[rel] = pf.metadata
                rows = pf.metadata.num_rows
            plan[subset].append((rel, min(rows, left)))
            left -= min(rows, left)
            if not left:
                break
    return plan, footers


@contextmanager
def open_source(source, rel, revision, download_dir=None, footer=None):
    """The ParquetFile of one source file: local, downloaded whole into download_dir, or (download_dir None, hub)
    read by ranges, with its footer (pyarrow FileMetaData) as already read, if given."""
    column = text_column(rel)
    if source != "hf":
        yield open_parquet(Path(source) / rel, column, footer=footer)
    elif download_dir is None:
        with open_remote(rel, revision) as f:
            yield open_parquet(f, column, name=f"{REPO_ID}/{rel}", footer=footer)
    else:
        yield open_parquet(fetch(source, rel, download_dir, revision), column)


def text_column(rel):
    """The column of a source file (subset/train-....parquet) that holds its documents' text."""
    return SUBSETS[rel.split("/")[0]]


# ----------------------------------------------------------------------------- writing shards

def open_parquet(path, column, name=None, footer=None):
    """The parquet file at path (or in a file object), checked to be readable and to have the text column `column`;
    with `footer` (its FileMetaData, read before) pyarrow does not read the footer again."""
    name = name or path
    try:
        pf = pq.ParquetFile(path, metadata=footer)
    except Exception as e:
        raise PrepareError(f"{name}: not a readable parquet file ({e}); delete it and rerun") from None
    if column not in pf.schema_arrow.names:
        raise PrepareError(f"{name}: no {column!r} column (columns: {', '.join(pf.schema_arrow.names)}); is this a "
                           f"smollm-corpus file? (prepare.py's SUBSETS names each subset's text column)")
    return pf


def tokenized_chunks(pf, column, pool, workers, rows):
    """Yield (tokens, lengths, skipped) per chunk of the file's first `rows` rows, in file order, with at most
    2 x workers chunks in flight. Reads one record batch at a time (only the text column), and only the row
    groups that hold those rows."""
    pending = deque()
    groups, covered = [], 0
    while covered < rows:
        covered += pf.metadata.row_group(len(groups)).num_rows
        groups.append(len(groups))
    left = rows
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=[column]):
        texts = batch.column(0).to_pylist()[:left]
        left -= len(texts)
        for i in range(0, len(texts), TOKENIZE_CHUNK_ROWS):
            chunk = texts[i:i + TOKENIZE_CHUNK_ROWS]
            if pool is None:
                yield tokenize_texts(chunk)
                continue
            pending.append(pool.submit(tokenize_texts, chunk))
            while len(pending) > 2 * workers:
                yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ShardWriter:
    """Appends documents to <name>.bin.tmp / <name>.idx.tmp; close() finishes and fsyncs both, commit() renames them
    into place."""

    def __init__(self, directory, name):
        self.bin_path, self.idx_path = directory / f"{name}.bin", directory / f"{name}.idx"
        self.bin = open(f"{self.bin_path}.tmp", "wb")
        self.offsets = [np.zeros(1, dtype=np.int64)]
        self.tokens = self.docs = 0

    def write(self, tokens, lengths):
        with naming(f"{self.bin_path}.tmp"):
            self.bin.write(memoryview(tokens))  # a plain write, so a full disk raises ENOSPC here
        self.offsets.append(self.tokens + np.cumsum(lengths))
        self.tokens += int(lengths.sum())
        self.docs += len(lengths)

    def close(self):
        """Write the index and fsync both .tmp files (the slow part, kept out of commit) -> {"docs", "tokens"}."""
        with naming(f"{self.bin_path}.tmp"):
            self.bin.flush()
            os.fsync(self.bin.fileno())
            self.bin.close()
        with naming(f"{self.idx_path}.tmp"), open(f"{self.idx_path}.tmp", "wb") as f:
            np.concatenate(self.offsets).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        return {"docs": self.docs, "tokens": self.tokens}

    def commit(self):
        atomic_write.replace(f"{self.bin_path}.tmp", self.bin_path)
        atomic_write.replace(f"{self.idx_path}.tmp", self.idx_path)


def tokenize_file(pf, column, rows, out_dir, shard_name, val_docs, pool, workers, progress):
    """Tokenize the first `rows` rows of one parquet file into its train shard (and, for a subset's first file, the
    val shard), on disk under .tmp names -> (the shards' writers, for the caller to commit; {"train": counts,
    "val": counts, "skipped_docs"})."""
    val = ShardWriter(out_dir, "val") if val_docs else None
    train = ShardWriter(out_dir, shard_name)
    skipped = 0
    for tokens, lengths, n_skipped in tokenized_chunks(pf, column, pool, workers, rows):
        skipped += n_skipped
        progress.update(len(lengths) + n_skipped, int(lengths.sum()))
        if val is not None and val.docs < val_docs:  # the first val_docs documents go to val
            k = min(val_docs - val.docs, len(lengths))
            split = int(lengths[:k].sum())
            val.write(tokens[:split], lengths[:k])
            tokens, lengths = tokens[split:], lengths[k:]
        train.write(tokens, lengths)
    result = {"train": train.close(), "skipped_docs": skipped}
    if val is not None:
        result["val"] = val.close()
    return [train] + ([val] if val is not None else []), result


# ----------------------------------------------------------------------------- meta.json and progress

@contextmanager
def naming(path):
    """An OSError raised inside names path: a failed write's error carries no file name, and a full disk's message
    should say which file it was writing."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    with naming(tmp), open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    atomic_write.replace(tmp, path)


def load_or_new_meta(out, source, revision, files, val_docs, docs):
    enc = get_encoding()
    fresh = {"tokenizer": TOKENIZER, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
             "source": REPO_ID if source == "hf" else "local", "revision": revision if source == "hf" else None,
             "val_docs": val_docs, "subsets": {s: {"files": len(paths), "shards": []} for s, paths in files.items()}}
    if docs:
        fresh["docs"] = docs
    path = out / "meta.json"
    if not path.exists():
        return fresh
    meta = json.loads(path.read_text())
    for key in ("tokenizer", "val_docs", "source", "revision", "docs"):
        if meta.get(key) != fresh.get(key):
            raise PrepareError(f"{path} was written with {key}={meta.get(key)!r}, this run has {fresh.get(key)!r}; "
                               f"use the same options to resume, or a new --out")
    for subset in files:  # a subset added on a later run starts with no shards
        meta["subsets"].setdefault(subset, fresh["subsets"][subset])
        meta["subsets"][subset]["files"] = len(files[subset])
    return meta


class Progress:
    """One line on stderr: files done/total, documents, tokens, tokens/s, ETA."""

    def __init__(self, files_total, files_done):
        self.files_total, self.files_done = files_total, files_done
        self.start_done = files_done  # files finished by an earlier run don't count towards this run's speed
        self.docs = self.tokens = 0
        self.file_rows = self.file_rows_done = 0
        self.start = self.last = time.time()
        self.line_open = False  # a progress line without its newline is on the terminal

    def start_file(self, rows):
        self.file_rows, self.file_rows_done = max(rows, 1), 0

    def update(self, rows, tokens, force=False):
        self.docs += rows
        self.tokens += tokens
        self.file_rows_done += rows
        now = time.time()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        elapsed = now - self.start
        done = self.files_done + min(self.file_rows_done / self.file_rows, 1.0)
        eta = elapsed / max(done - self.start_done, 1e-9) * (self.files_total - done) if done > self.start_done else 0
        print(f"\r[prepare] files {self.files_done}/{self.files_total} | docs {self.docs:,} | tokens {self.tokens:,} "
              f"| {self.tokens / max(elapsed, 1e-9) / 1e6:.2f}M tok/s | ETA {format_seconds(eta)}   ",
              end="", file=sys.stderr, flush=True)
        self.line_open = True

    def warn(self, message):
        """A warning on a line of its own: the progress line (rewritten in place with \r) is ended first."""
        print(("\n" if self.line_open else "") + f"[prepare] warning: {message}", file=sys.stderr, flush=True)
        self.line_open = False

    def file_finished(self):
        self.files_done, self.file_rows_done = self.files_done + 1, 0
        self.update(0, 0, force=True)


def format_seconds(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ----------------------------------------------------------------------------- main

def shard_files_exist(out, subset, shard, meta):
    """Whether a shard listed in meta.json is on disk (its .bin and .idx, and the val pair it wrote, if any)."""
    names = [shard["name"]] + (["val"] if shard["name"] == "train-00000" and "val" in meta["subsets"][subset] else [])
    return all((out / subset / f"{name}{ext}").exists() for name in names for ext in (".bin", ".idx"))


def prepare(source, out, subsets, fraction, val_docs, workers, keep_parquet, revision, subsets_required=True,
            docs=None):
    out = Path(out)
    files = list_source_files(source, subsets, revision, subsets_required)
    subsets = [s for s in subsets if s in files]
    footers = {}  # --docs: the footers the plan has read
    if docs:  # {subset: [(path, rows)]}: rows of a file's start; None: the whole file
        plan, footers = first_docs_files(source, files, docs, revision)
    else:
        plan = {s: [(p, None) for p in paths[:math.ceil(fraction * len(paths))]] for s, paths in files.items()}
    files = {s: [p for p, _ in entries] for s, entries in plan.items()}
    out.mkdir(parents=True, exist_ok=True)
    meta = load_or_new_meta(out, source, revision, files, val_docs, docs)
    done = {(s, sh["source"]) for s in meta["subsets"] for sh in meta["subsets"][s]["shards"]
            if shard_files_exist(out, s, sh, meta)}  # a shard deleted since (e.g. found corrupt) is redone
    todo = [(s, i, p, rows) for s in subsets for i, (p, rows) in enumerate(plan[s]) if (s, p) not in done]
    total = sum(len(p) for p in files.values())
    progress = Progress(total, total - len(todo))
    print(f"[prepare] {total} files ({', '.join(f'{s}: {len(p)}' for s, p in files.items())}), "
          f"{len(todo)} to do, {workers} workers -> {out}", file=sys.stderr)
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) if workers > 1 else None
    try:
        for subset, i, rel, rows in todo:
            (out / subset).mkdir(exist_ok=True)
            download_dir = out / "download" if rows is None else None  # --docs reads ranges, downloads nothing
            with open_source(source, rel, revision, download_dir, footers.get(rel)) as pf:
                read = f"has {pf.metadata.num_rows} rows" if rows is None else f"gives --docs {rows} rows"
                rows = pf.metadata.num_rows if rows is None else rows
                progress.start_file(rows)
                wanted_val = 0
                if i == 0 and val_docs:  # deterministic (from the rows read), so a rerun makes the same split
                    wanted_val = min(val_docs, max(1, int(VAL_MAX_SHARE * rows)))
                    if wanted_val < val_docs:
                        progress.warn(f"{rel} {read}: val takes {wanted_val} documents (at most "
                                      f"{VAL_MAX_SHARE:.0%} of a subset's first file), not --val-docs {val_docs}")
                writers, result = tokenize_file(pf, text_column(rel), rows, out / subset, f"train-{i:05d}",
                                                wanted_val, pool, workers, progress)
            shards = meta["subsets"][subset]["shards"]
            shards[:] = [sh for sh in shards if sh["source"] != rel]  # a redone shard replaces its old entry
            shards.append({"name": f"train-{i:05d}", "source": rel, **result["train"],
                           "skipped_docs": result["skipped_docs"]})
            shards.sort(key=lambda sh: sh["name"])
            if "val" in result:
                meta["subsets"][subset]["val"] = result["val"]
                if result["val"]["docs"] < wanted_val or result["train"]["docs"] == 0:
                    progress.warn(f"{rel} has {result['val']['docs'] + result['train']['docs']} documents: "
                                  f"{result['val']['docs']} went to val and {result['train']['docs']} to train "
                                  f"(--val-docs {val_docs})")
            with signals_deferred():  # SIGTERM/SIGINT stop before this file's shards and meta.json change or after
                for writer in writers:
                    writer.commit()
                write_json_atomic(out / "meta.json", meta)
            if download_dir is not None and source == "hf" and not keep_parquet:
                (download_dir / rel).unlink()  # disk holds tokens, not both
            progress.file_finished()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            writing = f" (writing {e.filename})" if e.filename else ""
            raise PrepareError(f"no space left on the device holding {out}{writing}; free space or use --out on a "
                               f"bigger disk, then rerun to resume") from None
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    print(file=sys.stderr)
    n_tokens = sum(sh["tokens"] for s in subsets for sh in meta["subsets"][s]["shards"])
    print(f"[prepare] done: {n_tokens:,} train tokens in {out}", file=sys.stderr)
    return meta


# ----------------------------------------------------------------------------- stopping on SIGTERM and SIGINT

_deferring = False  # inside signals_deferred(): a stop signal is only recorded in _pending
_pending = []


def on_stop_signal(signum, frame):
    if _deferring:
        _pending.append(signum)
    else:
        stop(signum)


def stop(signum):
    """Exit at once with 128 + signum, killing the workers; the .tmp files left behind are redone by a rerun.

    Nothing is raised into the interrupted code: the main thread may be anywhere, inside concurrent.futures holding
    the locks that shutting the pool down needs (a hang), in a fork hook that swallows exceptions, or in a print to
    stderr (which cannot be reentered, hence os.write)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C meanwhile adds no second message
    message = f"\nprepare.py: stopped by {signal.Signals(signum).name}; rerun the same command to resume\n"
    try:
        os.write(2, message.encode())
        for child in multiprocessing.active_children():  # on Linux they would die with prepare.py anyway
            child.kill()
    except Exception:  # whatever fails here (stderr closed, a worker just gone), exit all the same
        pass
    os._exit(128 + signum)


@contextmanager
def signals_deferred():
    """SIGTERM and SIGINT wait until the block is done, so its renames happen all or none."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        if _pending:
            stop(_pending[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="hf", help="'hf' to download from the hub, or a local directory")
    p.add_argument("--out", default="data/smollm", help="output directory")
    p.add_argument("--subsets", default=None,
                   help=f"comma-separated subsets (default: {','.join(SUBSETS)}; a local --source may lack one)")
    p.add_argument("--fraction", type=float, default=1.0, help="take the first ceil(F x files) files of each subset")
    p.add_argument("--docs", type=int, default=None,
                   help="take only the first N documents of each subset (from the hub: range requests, no whole files)")
    p.add_argument("--val-docs", type=int, default=1000,
                   help=f"documents of each subset's first file kept for val (at most {VAL_MAX_SHARE:.0%} of that file)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    p.add_argument("--keep-parquet", action="store_true", help="keep downloaded parquet files after tokenizing")
    p.add_argument("--revision", default=REVISION, help="hub revision (commit) to download")
    args = p.parse_args(argv)
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop_signal)
    subsets = [s for s in (args.subsets or ",".join(SUBSETS)).split(",") if s]
    unknown = [s for s in subsets if s not in SUBSETS]
    try:
        if unknown:
            raise PrepareError(f"--subsets: unknown subset(s) {', '.join(unknown)}; choose from {', '.join(SUBSETS)}")
        if not 0 < args.fraction <= 1:
            raise PrepareError(f"--fraction {args.fraction}: must be in (0, 1]")
        if args.docs is not None and args.docs < 1:
            raise PrepareError(f"--docs {args.docs}: must be >= 1 (documents per subset)")
        if args.docs is not None and args.fraction != 1.0:
            raise PrepareError(f"--docs {args.docs} and --fraction {args.fraction} both choose how much to read; "
                               f"give one of them")
        if args.val_docs < 0 or args.workers < 1:
            raise PrepareError("--val-docs must be >= 0 and --workers >= 1")
        prepare(args.source, args.out, subsets, args.fraction, args.val_docs, args.workers, args.keep_parquet,
                args.revision, subsets_required=args.subsets is not None, docs=args.docs)
    except PrepareError as e:
        print(f"\nprepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
