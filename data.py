"""Packed training blocks with per-token document ids, read from the shards that prepare.py writes.

    from data import PackedLoader
    loader = PackedLoader("data/smollm", split="train", block_size=4096, batch_size=8, rank=0, world_size=1)
    x, y, doc_ids, cu_seqlens = loader.next_batch()  # int64 [batch_size, block_size] x3; int32 [capacity + 1]
    state = loader.state_dict()                  # plain ints, lists and strings: goes into the checkpoint
    notes = loader.load_state_dict(state)        # resumes with exactly the batches an uninterrupted loader gives
    PackedLoader(..., mixture="cosmopedia-v2:0.7,fineweb-edu-dedup:0.3")  # train documents drawn by these weights

Train documents: every subset's documents are visited in a seeded shuffled order (shard order shuffled, then
documents within a shard), holding only one shard's permutation in memory. Rank r of w takes every w-th document
of each shuffled shard: the ranks read disjoint documents with no communication and together cover every document
once per epoch. Before each document is drawn, a subset is picked at random:
- mixture '' (the default): with probability proportional to the documents it has left on this rank, so all
  subsets run out together and an epoch reads every document once;
- mixture 'name:weight,...': with probability weight / sum of weights (a subset not named is never drawn). A subset
  that runs out starts an epoch of its own at once (a new shuffle), while the others go on; the loader's `epoch` is
  then the number of passes that every weighted subset has completed.
The draws are a hash of (seed, rank, draw number), so the checkpoint holds no RNG state.

Packing: drawn documents form one stream, cut into rows of block_size + 1 tokens; x = row[:-1], y = row[1:].
No padding, no truncation: a document that doesn't fit continues at the start of the next row. doc_ids[b, t]
numbers the segments of row b (0, 1, 2, ...): t may attend to s only if s <= t and doc_ids[b, s] == doc_ids[b, t].
cu_seqlens lists the same segments as start offsets in the flattened [batch_size * block_size] batch, the form
varlen flash kernels take, padded with empty segments to a size fixed by the batch shape (segment_capacity), so
no backend has to find the boundaries on the device (a nonzero, which syncs) and compiled code sees one shape.
On CUDA all four tensors arrive through pinned memory with non_blocking copies.

split="val" reads each subset's val shard in file order (subset=... picks one subset), cycling, so a fresh val
loader always yields the same blocks.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tokenizer import TOKENIZER  # what prepare.py writes; token ids must mean the same thing to the model


class DataError(SystemExit):
    """Bad or missing data: the message says what is wrong and what to do; exits non-zero when uncaught."""


def read_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"no prepared data in {data_dir} ({path} is missing); "
                        f"run: python prepare.py --out {data_dir} (the whole corpus; add --docs 2000 for a sample of "
                        f"megabytes, or --source DIR for a local copy)")
    meta = json.loads(path.read_text())
    if meta.get("tokenizer") != TOKENIZER or meta.get("dtype") != "uint16":
        raise DataError(f"{path} was written with tokenizer {meta.get('tokenizer')!r} and dtype {meta.get('dtype')!r}; "
                        f"smoltrain reads {TOKENIZER!r} uint16 shards. Re-run prepare.py into a new --out")
    return meta


def check_vocab(data_dir, vocab_size):
    """Raise a DataError when a model of vocab_size tokens cannot read the prepared data in data_dir."""
    data_vocab = read_meta(data_dir)["vocab_size"]
    if data_vocab > vocab_size:
        raise DataError(f"vocab_size={vocab_size} is below the {data_vocab} tokens of the data's tokenizer")


def count_tokens(data_dir, split="train"):
    """Tokens of all ranks together in one epoch of `split` (e.g. for the default training length)."""
    meta = read_meta(data_dir)
    if split == "val":
        return sum(s.get("val", {}).get("tokens", 0) for s in meta["subsets"].values())
    return sum(sh["tokens"] for s in meta["subsets"].values() for sh in s["shards"])


def count_val_batches(data_dir, subsets, block_size, batch_size, world_size, seed, eval_iters, warn=print):
    """Validation batches per subset: eval_iters, or fewer where that would read more than the smallest rank's share
    of the subset's val shard: with many ranks, each would re-read its documents for no new information (warn says
    so)."""
    counts = {}
    for subset in subsets:
        share = min(PackedLoader(data_dir, "val", block_size, batch_size, rank=r, world_size=world_size, seed=seed,
                                 subset=subset).tokens_per_epoch() for r in range(world_size))
        counts[subset] = max(1, min(eval_iters, share // (batch_size * (block_size + 1))))  # a row: block_size + 1
        if counts[subset] < eval_iters:
            warn(f"warning: the {subset} val shard holds {share:,} tokens per rank of {world_size}: validation reads "
                 f"{counts[subset]} batches of {batch_size} x {block_size}, not eval_iters={eval_iters}, so that no "
                 f"rank reads a val document twice")
    return counts


def parse_mixture(text, subsets):
    """The weights of a mixture 'name:weight,...' as a list in the order of `subsets` (summing to 1; a subset not
    named weighs 0), or None for '' (the proportional draw). A DataError names a bad entry."""
    if not text:
        return None
    weights = dict.fromkeys(subsets, 0.0)
    for entry in text.split(","):
        name, _, value = entry.strip().rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not name or weight is None or not weight >= 0 or weight == float("inf"):
            raise DataError(f"mixture={text!r}: {entry.strip()!r} is not 'subset:weight' with a weight >= 0, e.g. "
                            f"--mixture=cosmopedia-v2:0.7,fineweb-edu-dedup:0.3")
        if name not in weights:
            raise DataError(f"mixture={text!r}: no subset {name!r} in the prepared data (it has: {', '.join(subsets)})")
        weights[name] = weight
    total = sum(weights.values())
    if total == 0:
        raise DataError(f"mixture={text!r}: every weight is 0; give at least one subset a weight above 0")
    return [weights[name] / total for name in subsets]


class Shard:
    """One .bin/.idx pair as memmaps, opened once; checks that the token file and the offsets agree."""

    def __init__(self, directory, name, docs, tokens):
        bin_path, idx_path = directory / f"{name}.bin", directory / f"{name}.idx"
        for p in (bin_path, idx_path):
            if not p.exists():
                raise DataError(f"shard file {p} is missing; re-run prepare.py with the same options to redo it")
        n_tokens = bin_path.stat().st_size // 2
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r")
        # np.memmap refuses empty files; an empty shard (every document went to val) is legal
        self.tokens = np.memmap(bin_path, dtype=np.uint16, mode="r") if n_tokens else np.zeros(0, np.uint16)
        self.n_docs = len(self.offsets) - 1
        if (bin_path.stat().st_size % 2 or self.n_docs != docs or n_tokens != tokens
                or self.offsets[0] != 0 or self.offsets[-1] != n_tokens):
            raise DataError(f"corrupt shard {bin_path}: {n_tokens} tokens and {self.n_docs} documents on disk, "
                            f"index ends at {int(self.offsets[-1]) if len(self.offsets) else None}, meta.json says "
                            f"{tokens} tokens and {docs} documents; delete it and its .idx, then re-run prepare.py")
        # With the ends checked above, offsets that never decrease also all lie inside the shard. One vectorised pass
        # at open (about 1 ms per million documents); a wrong offset would misplace documents or read some twice.
        decreasing = np.flatnonzero(np.diff(self.offsets) < 0)
        if decreasing.size:
            i = int(decreasing[0]) + 1
            raise DataError(f"corrupt index {idx_path}: document offset {i} is {int(self.offsets[i])}, below offset "
                            f"{i - 1} ({int(self.offsets[i - 1])}); offsets must rise from 0 to the shard's {n_tokens} "
                            f"tokens. Delete it and its .bin, then re-run prepare.py with the same options to "
                            f"redo them")
        self.bin_path = bin_path

    def document(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def describe_mixture(weights, subsets):
    return ("in proportion to the documents left" if weights is None else
            ", ".join(f"{name} {w:.3g}" for name, w in zip(subsets, weights)))


def rank_share(n, rank, world_size):
    """How many of n documents rank takes (every world_size-th, starting at rank)."""
    return len(range(rank, n, world_size))


def uniform(*key):
    """A reproducible float in [0, 1) from integers: the subset draws need no RNG state in the checkpoint."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def segment_capacity(batch_size, block_size, n_segments):
    """Length - 1 of a batch's padded cu_seqlens: batch_size * max(4, block_size // 256) segments, doubled until
    n_segments fits. A pure function of the batch, so a resumed loader pads exactly as before. Smollm documents
    average ~700-1000 tokens (about 49 segments in an 8 x 4096 batch against 128 slots), so the doubling, which
    changes the shape and makes compiled code recompile once, is rare. Slots are kept few on purpose: a varlen
    kernel launches its thread blocks per slot, empty or not."""
    capacity = batch_size * max(4, block_size // 256)
    while capacity < n_segments:
        capacity *= 2
    return capacity


def to_device(t, device):
    """A host tensor on device: on CUDA through pinned memory with a non_blocking copy, so the host does not wait
    for the GPU (a copy from pageable memory is a stream sync); elsewhere as it is."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def cu_seqlens_of(doc_ids):
    """int32 numpy [segment_capacity + 1]: segment start offsets of doc_ids (numpy [B, T], segments numbered
    0, 1, 2, ... per row) in the flattened batch, then B * T for the end and for every empty padding slot."""
    B, T = doc_ids.shape
    lengths = np.concatenate([np.bincount(row) for row in doc_ids])
    cu = np.full(segment_capacity(B, T, len(lengths)) + 1, B * T, dtype=np.int32)
    cu[0] = 0
    cu[1:len(lengths) + 1] = np.cumsum(lengths)
    return cu


class PackedLoader:
    def __init__(self, data_dir, split="train", block_size=4096, batch_size=8, rank=0, world_size=1, seed=1337,
                 subset=None, device=None, mixture=""):
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        meta = read_meta(data_dir)
        names = list(meta["subsets"])
        if subset is not None and subset not in names:
            raise DataError(f"subset {subset!r} is not in {data_dir} (it has: {', '.join(names)})")
        self.subsets = [subset] if subset else names
        self.n_vocab = meta["vocab_size"]  # token ids at or above it mean a corrupt shard
        self.split, self.subset, self.seed = split, subset, seed
        self.block_size, self.batch_size, self.rank, self.world_size = block_size, batch_size, rank, world_size
        self.device = torch.device(device) if device is not None else None
        root = Path(data_dir)
        self.shards = []  # per subset: list of Shard
        for name in self.subsets:
            info = meta["subsets"][name]
            if split == "val":
                if "val" not in info or info["val"]["docs"] == 0:
                    raise DataError(f"{data_dir} has no val documents for {name}; "
                                    f"re-run prepare.py with --val-docs N (N > 0) into a new --out")
                self.shards.append([Shard(root / name, "val", info["val"]["docs"], info["val"]["tokens"])])
            else:
                self.shards.append([Shard(root / name, sh["name"], sh["docs"], sh["tokens"]) for sh in info["shards"]])
        self.docs_per_epoch = [sum(rank_share(s.n_docs, rank, world_size) for s in shards) for shards in self.shards]
        if sum(self.docs_per_epoch) == 0:
            raise DataError(f"rank {rank} of {world_size} gets no {split} documents from {data_dir} "
                            f"(subsets {', '.join(self.subsets)}); prepare more data or use fewer ranks")
        self.mixture = parse_mixture(mixture, self.subsets) if split == "train" else None
        empty = [name for name, w, n in zip(self.subsets, self.mixture or [], self.docs_per_epoch) if w > 0 and n == 0]
        if empty:
            raise DataError(f"mixture={mixture!r} weighs {', '.join(empty)}, but rank {rank} of {world_size} gets no "
                            f"train documents from it in {data_dir}; prepare more data or give it weight 0")
        self.draws, self.carry = 0, None
        self.start_epoch(0)

    # ------------------------------------------------------------------ document order

    def start_epoch(self, epoch):
        """Every subset starts epoch `epoch` (the proportional draw: all of them together)."""
        self.epochs, self.draws = [epoch] * len(self.subsets), 0
        self.position = [[0, 0] for _ in self.subsets]  # per subset: (index into shard order, index into share)
        self.left = list(self.docs_per_epoch)
        self.shard_orders = [self.shard_order(s) for s in range(len(self.subsets))]
        self.current_share = [None] * len(self.subsets)  # per subset: (shard, this rank's documents of it)

    def start_subset_epoch(self, s):
        """Subset s alone starts its next epoch (a mixture: the others go on where they are)."""
        self.epochs[s] += 1
        self.position[s], self.left[s], self.current_share[s] = [0, 0], self.docs_per_epoch[s], None
        self.shard_orders[s] = self.shard_order(s)

    def shard_order(self, s):
        n = len(self.shards[s])
        if self.split == "val":
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epochs[s], s]).permutation(n)

    @property
    def epoch(self):
        """Completed passes over the data: with a mixture, the fewest that any weighted subset has completed."""
        return min(e for e, w in zip(self.epochs, self.mixture or [1] * len(self.epochs)) if w > 0)

    def share(self, s, shard):
        """This rank's documents of one shard, in visiting order (the only per-document array held in memory)."""
        if self.current_share[s] is None or self.current_share[s][0] != shard:
            self.current_share[s] = (shard, self.documents_of(s, shard))
        return self.current_share[s][1]

    def documents_of(self, s, shard):
        n = self.shards[s][shard].n_docs
        order = np.arange(n) if self.split == "val" else \
            np.random.default_rng([self.seed, self.epochs[s], s, shard]).permutation(n)
        return order[self.rank::self.world_size]

    def tokens_per_epoch(self):
        """Tokens of this rank's documents in the current epoch, e.g. to read each val document at most once."""
        return sum(int(np.diff(shard.offsets)[self.documents_of(s, i)].sum())
                   for s, shards in enumerate(self.shards) for i, shard in enumerate(shards))

    def pick_subset(self):
        if self.mixture is not None:
            return self.pick_weighted()
        total = sum(self.left)
        if total == 0:
            self.start_epoch(max(self.epochs) + 1)
            total = sum(self.left)
        if self.split == "val":  # deterministic: subsets one after another
            return next(s for s, n in enumerate(self.left) if n)
        u = uniform(self.seed, self.rank, max(self.epochs), self.draws) * total
        for s, n in enumerate(self.left):
            if u < n:
                return s
            u -= n
        return max(s for s, n in enumerate(self.left) if n)  # float round-off at the very top of the range

    def pick_weighted(self):
        u = uniform(self.seed, self.rank, "mixture", self.draws)  # draws count on across epochs here
        s = next((s for s, c in enumerate(np.cumsum(self.mixture)) if u < c), None)
        if s is None or self.mixture[s] == 0:  # float round-off at the very top of the range
            s = max(s for s, w in enumerate(self.mixture) if w > 0)
        if self.left[s] == 0:
            self.start_subset_epoch(s)
        return s

    def draw_document(self):
        """(subset, shard, document) of the next document on this rank."""
        s = self.pick_subset()
        self.draws += 1
        while True:
            shard_pos, doc_pos = self.position[s]
            shard = int(self.shard_orders[s][shard_pos])
            share = self.share(s, shard)
            if doc_pos < len(share):
                self.position[s][1] += 1
                self.left[s] -= 1
                return s, shard, int(share[doc_pos])
            self.position[s] = [shard_pos + 1, 0]

    # ------------------------------------------------------------------ packing

    def next_batch(self):
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        segments = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        pieces = []  # (row, position, length, subset, shard, document, offset) of each copied piece, for errors
        for b in range(self.batch_size):
            pos, segment = 0, 0
            while pos < self.block_size + 1:
                if self.carry is None:
                    self.carry = (*self.draw_document(), 0)
                s, shard, doc, offset = self.carry
                tokens = self.shards[s][shard].document(doc)
                n = min(len(tokens) - offset, self.block_size + 1 - pos)
                rows[b, pos:pos + n] = tokens[offset:offset + n]
                pieces.append((b, pos, n, s, shard, doc, offset))
                segments[b, pos:pos + n] = segment
                pos, segment = pos + n, segment + 1
                self.carry = (s, shard, doc, offset + n) if offset + n < len(tokens) else None
        if rows.max() >= self.n_vocab:  # on the host, before the device: ~10 us for 32k tokens
            self.refuse_token_ids(rows, pieces)
        cu_seqlens = torch.from_numpy(cu_seqlens_of(segments[:, :-1]))
        x, y, doc_ids = (torch.from_numpy(a) for a in (rows[:, :-1], rows[:, 1:], segments[:, :-1]))
        batch = (x.contiguous(), y.contiguous(), doc_ids.contiguous(), cu_seqlens)
        return batch if self.device is None else tuple(to_device(t, self.device) for t in batch)

    def refuse_token_ids(self, rows, pieces):
        """Stop with the shard, document and id of the first token id outside the tokenizer's vocabulary (bytes of
        a .bin overwritten): on the device it would be an index error, on a GPU a device-side assert."""
        for b, pos, n, s, shard, doc, offset in pieces:
            bad = np.flatnonzero(rows[b, pos:pos + n] >= self.n_vocab)
            if bad.size:
                path = self.shards[s][shard].bin_path
                raise DataError(f"corrupt shard {path}: token {offset + int(bad[0])} of document {doc} has id "
                                f"{int(rows[b, pos + bad[0]])}, but the tokenizer {TOKENIZER} has {self.n_vocab} "
                                f"tokens. Delete it and its .idx, then re-run prepare.py with the same options to "
                                f"redo them")

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self):
        return {"split": self.split, "subsets": list(self.subsets), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "epoch": self.epoch, "epochs": list(self.epochs), "draws": self.draws,
                "position": [list(p) for p in self.position], "left": list(self.left),
                "carry": list(self.carry) if self.carry is not None else [], "mixture": self.mixture}

    def load_state_dict(self, state):
        """Continue where `state` stopped. Returns notes for the log: a mixture other than the state's applies from
        here on (every subset keeps its place in its epoch)."""
        mine = self.state_dict()
        for key in ("split", "subsets", "seed", "world_size", "rank"):
            if state.get(key) != mine[key]:
                raise DataError(f"data loader state was saved with {key}={state.get(key)!r}, this loader has "
                                f"{key}={mine[key]!r}: the document order depends on it, so it cannot resume. "
                                f"Start the data stream afresh (train.py: --restore_data_state=False)")
        self.epochs = list(state.get("epochs", [state["epoch"]] * len(self.subsets)))  # a state from before mixtures
        self.draws = state["draws"]
        self.position = [list(p) for p in state["position"]]
        self.left = list(state["left"])
        self.shard_orders = [self.shard_order(s) for s in range(len(self.subsets))]
        self.current_share = [None] * len(self.subsets)
        self.carry = tuple(state["carry"]) if state["carry"] else None
        theirs = state.get("mixture")
        if theirs == self.mixture:
            return []
        if self.mixture is None:  # proportional from here: each subset's documents left, then all start afresh
            self.draws = 0
        return [f"mixture changed from {describe_mixture(theirs, self.subsets)} to "
                f"{describe_mixture(self.mixture, self.subsets)}: the new one applies from here, each subset going on "
                f"from its place"]
