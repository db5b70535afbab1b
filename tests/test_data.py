"""data.py against real shards on disk, written by prepare.py (the prepared_data fixture)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from data import DataError, PackedLoader, count_tokens, cu_seqlens_of, segment_capacity

EOT = 50256


def epoch_documents(loader, epochs=1):
    """Every document this rank emits in its first `epochs` epochs, as token tuples, read back from the stream."""
    stream = []
    while loader.epoch < epochs:  # a new epoch starts only once the last document was fully emitted
        x, y, *_ = loader.next_batch()
        for b in range(x.shape[0]):
            stream.append(x[b].numpy())
            stream.append(y[b, -1:].numpy())
    stream = np.concatenate(stream)
    starts = np.flatnonzero(stream == EOT).tolist() + [len(stream)]
    docs = [tuple(stream[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]
    return docs[:epochs * sum(loader.docs_per_epoch)]


def all_documents(data_dir, subset):
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    docs = []
    for sh in meta["subsets"][subset]["shards"]:
        tokens = np.fromfile(Path(data_dir) / subset / f"{sh['name']}.bin", dtype=np.uint16)
        offsets = np.fromfile(Path(data_dir) / subset / f"{sh['name']}.idx", dtype=np.int64)
        docs += [tuple(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def test_ranks_read_disjoint_documents_and_cover_the_epoch(prepared_data):
    everything = all_documents(prepared_data, "cosmopedia-v2") + all_documents(prepared_data, "fineweb-edu-dedup")
    seen = []
    for rank in range(3):
        loader = PackedLoader(prepared_data, block_size=64, batch_size=4, rank=rank, world_size=3)
        docs = epoch_documents(loader)
        assert len(docs) == len(set(docs)) == sum(loader.docs_per_epoch)
        seen += docs
    assert len(seen) == len(set(seen))          # disjoint across ranks
    assert sorted(seen) == sorted(everything)   # and together every train document exactly once
    # the next epoch visits the same documents in a fresh order
    loader = PackedLoader(prepared_data, block_size=64, batch_size=4)
    docs = epoch_documents(loader, epochs=2)
    first, second = docs[:len(docs) // 2], docs[len(docs) // 2:]
    assert sorted(first) == sorted(second) and first != second


def test_subsets_are_drawn_in_proportion_and_run_out_together(prepared_data):
    loader = PackedLoader(prepared_data, block_size=32, batch_size=2, seed=11)
    totals = loader.docs_per_epoch
    assert totals[0] > 1.5 * totals[1] > 0   # unequal subsets, so proportional drawing matters
    gaps, ran_out = [], None
    while loader.epoch == 0:
        loader.next_batch()
        left = loader.state_dict()["left"]
        assert min(left) >= 0
        if loader.epoch == 0:
            gaps.append(abs(left[0] / totals[0] - left[1] / totals[1]))
            if ran_out is None and 0 in left:
                ran_out = max(l / t for l, t in zip(left, totals))
    assert max(gaps) < 0.15
    assert ran_out is not None and ran_out < 0.08   # when one subset empties, the other is (almost) empty too
    # a subset with nothing left is never drawn: draw counts match the documents exactly
    picks = []
    loader = PackedLoader(prepared_data, block_size=32, batch_size=2, seed=3)
    while loader.epoch == 0:
        before = list(loader.left)
        s, _, _ = loader.draw_document()
        if loader.epoch == 0:
            assert before[s] > 0
            picks.append(s)
    assert picks.count(0) == totals[0] and picks.count(1) == totals[1]


def test_mixture_weights_drive_the_shares_and_a_weighted_subset_that_runs_out_starts_again(prepared_data):
    """mixture='cosmopedia-v2:0.2,fineweb-edu-dedup:0.8' against the data's own proportions (about 1.9 : 1): over 4,000
    documents each subset's share is its weight within 4 standard errors; fineweb-edu-dedup, the smaller one drawn more,
    runs out and starts epochs of its own while cosmopedia-v2 goes on, and `epoch` counts the passes both completed."""
    loader = PackedLoader(prepared_data, block_size=32, batch_size=2, seed=11,
                          mixture="cosmopedia-v2:0.2,fineweb-edu-dedup:0.8")
    picks = [loader.draw_document()[0] for _ in range(4000)]
    share = picks.count(1) / len(picks)
    assert abs(share - 0.8) < 4 * (0.8 * 0.2 / len(picks)) ** 0.5, share
    fineweb_passes = 4000 * 0.8 / loader.docs_per_epoch[1]
    assert loader.epochs[1] >= int(fineweb_passes) - 1 >= 15 and loader.epochs[0] < loader.epochs[1]
    assert loader.epoch == loader.epochs[0]
    # one subset only: the other is never drawn, and a weight of 0 counts as absent
    only = PackedLoader(prepared_data, block_size=32, batch_size=2, mixture="fineweb-edu-dedup:1,cosmopedia-v2:0")
    assert {only.draw_document()[0] for _ in range(300)} == {1} and only.epoch >= 1
    for text, words in (("cosmo:1", "no subset 'cosmo'"), ("cosmopedia-v2:-1", "weight >= 0"),
                        ("cosmopedia-v2", "'subset:weight'"), ("cosmopedia-v2:0", "every weight is 0")):
        with pytest.raises(DataError, match=words):
            PackedLoader(prepared_data, block_size=32, batch_size=2, mixture=text)


def test_mixture_resumes_exactly_and_a_changed_mixture_applies_from_the_resume(prepared_data):
    mixture = "cosmopedia-v2:1,fineweb-edu-dedup:3"
    a = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=1, world_size=2, seed=5, mixture=mixture)
    for _ in range(60):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=1, world_size=2, seed=5, mixture=mixture)
    assert b.load_state_dict(state) == []
    for _ in range(300):  # across several epochs of the weighted subsets
        for ta, tb in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(ta, tb)
    assert a.epochs == b.epochs and a.epochs[1] >= 2
    # another mixture on resume: said, and applied from there (each subset goes on from its place)
    c = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=1, world_size=2, seed=5,
                     mixture="fineweb-edu-dedup:1")
    notes = c.load_state_dict(state)
    assert len(notes) == 1 and "mixture changed from cosmopedia-v2 0.25, fineweb-edu-dedup 0.75 to" in notes[0]
    assert {c.draw_document()[0] for _ in range(200)} == {1}
    # a state from before mixtures (no 'epochs', no 'mixture') resumes the proportional stream exactly
    d = PackedLoader(prepared_data, block_size=48, batch_size=3, seed=5)
    for _ in range(30):
        d.next_batch()
    old = {k: v for k, v in d.state_dict().items() if k not in ("epochs", "mixture")}
    e = PackedLoader(prepared_data, block_size=48, batch_size=3, seed=5)
    assert e.load_state_dict(old) == []
    for _ in range(200):
        for td, te in zip(d.next_batch(), e.next_batch()):
            assert torch.equal(td, te)


def test_doc_ids_follow_document_boundaries(prepared_data):
    loader = PackedLoader(prepared_data, block_size=256, batch_size=4)
    documents = set(all_documents(prepared_data, "cosmopedia-v2") + all_documents(prepared_data, "fineweb-edu-dedup"))
    for _ in range(5):
        x, y, doc_ids, cu_seqlens = loader.next_batch()
        assert x.dtype == y.dtype == doc_ids.dtype == torch.int64 and x.shape == doc_ids.shape == (4, 256)
        # cu_seqlens: the same segments as start offsets in the flattened batch, padded to a fixed size
        flat = (doc_ids + 1000 * torch.arange(4)[:, None]).flatten()  # segment ids unique across rows
        starts = [0] + [t for t in range(1, 4 * 256) if flat[t] != flat[t - 1]]
        assert cu_seqlens.dtype == torch.int32 and len(cu_seqlens) == segment_capacity(4, 256, len(starts)) + 1
        assert cu_seqlens.tolist() == starts + [4 * 256] * (len(cu_seqlens) - len(starts))
        assert torch.equal(x[:, 1:], y[:, :-1])
        for b in range(4):
            ids, row = doc_ids[b].tolist(), x[b].tolist()
            assert ids[0] == 0 and all(0 <= ids[t] - ids[t - 1] <= 1 for t in range(1, 256))
            starts = [t for t in range(1, 256) if ids[t] != ids[t - 1]]
            assert starts == [t for t in range(1, 256) if row[t] == EOT]  # a new segment exactly where a doc opens
            bounds = [0] + starts + [256]
            for a, c in zip(bounds[1:-2], bounds[2:-1]):  # whole segments (not the first/last) are whole documents
                assert tuple(row[a:c]) in documents


def test_cu_seqlens_padding_and_capacity():
    # rows of 8 tokens: row 0 holds segments of 3 and 5 tokens, row 1 one of 8
    doc = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])
    assert segment_capacity(2, 8, 3) == 8
    assert cu_seqlens_of(doc).tolist() == [0, 3, 8, 16] + [16] * 5  # 8 slots + 1
    # more segments than slots: the capacity doubles (a pure function of the batch, so a resume pads alike)
    many = np.tile(np.arange(8), (2, 1))  # 16 one-token segments
    assert segment_capacity(2, 8, 16) == 16
    assert cu_seqlens_of(many).tolist() == list(range(17))
    assert segment_capacity(8, 4096, 49) == 128 and segment_capacity(8, 4096, 129) == 256


def test_state_dict_resumes_exactly(prepared_data):
    a = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=1, world_size=2, seed=5)
    for _ in range(40):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain ints, lists and strings
    assert state["carry"], "a document should be split across the resume point"
    b = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=1, world_size=2, seed=5)
    b.load_state_dict(state)
    for _ in range(400):   # far enough to cross into the next epoch
        batch_a, batch_b = a.next_batch(), b.next_batch()
        assert len(batch_a) == len(batch_b) == 4  # x, y, doc_ids and cu_seqlens all resume exactly
        for ta, tb in zip(batch_a, batch_b):
            assert torch.equal(ta, tb)
    assert a.epoch == b.epoch >= 1
    c = PackedLoader(prepared_data, block_size=48, batch_size=3, rank=0, world_size=3, seed=5)
    with pytest.raises(DataError, match="world_size=2.*restore_data_state=False"):
        c.load_state_dict(state)


def test_val_split_is_fixed_per_subset(prepared_data):
    blocks = []
    for _ in range(2):
        v = PackedLoader(prepared_data, split="val", subset="fineweb-edu-dedup", block_size=64, batch_size=2)
        blocks.append([v.next_batch() for _ in range(20)])  # more than the val docs hold: cycles
    for first, second in zip(*blocks):
        assert all(torch.equal(p, q) for p, q in zip(first, second))
    val_tokens = np.fromfile(prepared_data / "fineweb-edu-dedup/val.bin", dtype=np.uint16)
    assert blocks[0][0][0][0, :64].tolist() == val_tokens[:64].tolist()
    assert count_tokens(prepared_data, "train") == sum(
        sh["tokens"] for s in json.loads((prepared_data / "meta.json").read_text())["subsets"].values()
        for sh in s["shards"])


def test_tokens_per_epoch_is_each_ranks_share(prepared_data):
    meta = json.loads((prepared_data / "meta.json").read_text())
    for split in ("val", "train"):
        for world in (1, 3):
            loaders = [PackedLoader(prepared_data, split=split, block_size=64, batch_size=1, rank=r, world_size=world)
                       for r in range(world)]
            shares = [loader.tokens_per_epoch() for loader in loaders]
            assert sum(shares) == count_tokens(prepared_data, split)  # the ranks' shares cover the split once
            loader = loaders[-1]  # the tokens the last rank really reads in one epoch
            read = 0
            while loader.epoch == 0:
                s, shard, doc = loader.draw_document()
                read += len(loader.shards[s][shard].document(doc)) if loader.epoch == 0 else 0
            assert read == shares[-1]
    val = PackedLoader(prepared_data, split="val", subset="cosmopedia-v2", world_size=2, rank=1)
    assert val.tokens_per_epoch() < meta["subsets"]["cosmopedia-v2"]["val"]["tokens"]


def test_data_errors(tmp_path, prepared_data):
    with pytest.raises(DataError, match="run: python prepare.py --out .*missing .*--docs 2000 for a sample"):
        PackedLoader(tmp_path / "missing")
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(prepared_data, bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base"}))
    with pytest.raises(DataError, match="cl100k_base"):
        PackedLoader(bad)
    (bad / "meta.json").write_text(json.dumps(meta))
    shard = bad / "cosmopedia-v2/train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated shard no longer matches its index
    with pytest.raises(DataError, match="corrupt shard .*train-00001.bin"):
        PackedLoader(bad)
    with pytest.raises(DataError, match="python-edu"):
        PackedLoader(prepared_data, subset="python-edu")
    # uncaught, a DataError is one line on stderr and exit status 1
    proc = subprocess.run([sys.executable, "-c", f"import data; data.PackedLoader({str(tmp_path / 'missing')!r})"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "prepare.py" in proc.stderr


def test_overwritten_index_offsets_are_refused_at_open(tmp_path, prepared_data):
    import shutil
    shutil.copytree(prepared_data, tmp_path / "data")
    idx = tmp_path / "data/cosmopedia-v2/train-00000.idx"
    offsets = np.fromfile(idx, dtype=np.int64)
    k = len(offsets) // 2
    with open(idx, "r+b") as f:  # 8 bytes: one offset jumps past the next (one huge "document", part read twice)
        f.seek(8 * k)
        f.write(np.int64(offsets[k + 1] + 686_341).tobytes())
    with pytest.raises(DataError, match=rf"corrupt index .*cosmopedia-v2/train-00000\.idx: document offset {k + 1} "
                                        rf"is {offsets[k + 1]}, below offset {k} \({offsets[k + 1] + 686_341}\)"):
        PackedLoader(tmp_path / "data", block_size=64, batch_size=4)


def test_out_of_range_token_ids_stop_with_the_shards_name(tmp_path, prepared_data):
    import shutil
    shutil.copytree(prepared_data, tmp_path / "data")
    shard = tmp_path / "data/fineweb-edu-dedup/train-00000.bin"
    offsets = np.fromfile(shard.with_suffix(".idx"), dtype=np.int64)
    doc = len(offsets) // 3
    with open(shard, "r+b") as f:  # the 6th token of a document becomes id 65535 (the vocabulary ends at 50256)
        f.seek(2 * (offsets[doc] + 5))
        f.write(b"\xff\xff")
    loader = PackedLoader(tmp_path / "data", block_size=64, batch_size=4)
    with pytest.raises(DataError, match=rf"corrupt shard .*fineweb-edu-dedup/train-00000\.bin: token 5 of document "
                                        rf"{doc} has id 65535, but the tokenizer r50k_base has 50257 tokens"):
        while loader.epoch == 0:
            loader.next_batch()
