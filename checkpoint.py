"""
Checkpoint files of a run: `out_dir/ckpt-NNNNNNNN.pt`, NNNNNNNN being the optimizer step. Used by train.py, sample.py
and the tools.

    save(obj, out_dir, step, keep_last, keep_step=None)  torch.save to ckpt-NNNNNNNN.pt.tmp, fsync, rename; then
                                         delete all but the newest keep_last, and the one of step keep_step (the best
                                         so far, with keep_best). A crash mid-save, even kill -9, leaves only a .tmp
                                         file, which nothing reads, and the previous checkpoints intact.
    latest(out_dir) -> path or None      the newest complete checkpoint
    find(out_dir, ckpt_path) -> path     what sample.py, tools/export.py and init_weights read: ckpt_path, or
                                         out_dir's newest; 'best' (or DIR/best) is the kept checkpoint of the lowest
                                         mean validation loss (keep_best); a CheckpointError says what is missing
    remove_partial_files(out_dir)        delete the .tmp files a save killed mid-write left; returns their paths
    expected_bytes(model, optimizer)     the size of this run's checkpoints, known before the first step;
                                         space_warning(...) says when out_dir's disk cannot hold those it keeps
    to_resume(out_dir, init_from)        the checkpoint a run continues, or None; check_resumable(ckpt, ...) refuses
                                         one that this run's model, optimizer or ranks cannot continue
    load(path) -> dict                   verify the checksums, then torch.load(mmap=True, weights_only=True) on the
                                         CPU, or one clear error: the tensors stay in the file's page cache, so the
                                         ranks of a node share one copy instead of each reading the whole checkpoint
                                         into its own memory
    load_model(path, attn_impl) -> (model, ckpt)  the Transformer the checkpoint holds, in eval mode on the CPU, and
                                         the rest of the checkpoint (step, tokens_seen, ...); one clear error
                                         when this model.py cannot hold it
    rng_state(cuda), set_rng_state(rng, cuda)  this process's torch, CUDA, Python and numpy RNG states, and back

A checkpoint holds only tensors, plain containers, numbers and strings, so it loads with weights_only=True.

Checksums: torch.save writes a zip archive that stores a CRC32 of every record (the pickle and each tensor's bytes);
save() makes sure they are computed, and load() checks them all before unpickling (zipfile.testzip: about 2.4 GB/s on
one CPU core, 0.2 s for 512 MB), so bytes changed on disk after the save are an error naming the file, not weights
that turn into NaN a step later.
"""

import dataclasses
import errno
import glob
import hashlib
import os
import random
import re
import shutil
import zipfile

import numpy as np
import torch

import atomic_write
import optim
from model import ModelConfig, Transformer

PATTERN = re.compile(r"ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that a run cannot continue from, or cannot be found: the message says what differs and what to
    do."""


class SaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, say): its partial file is gone, the earlier checkpoints
    are intact, and the message says what to do."""


def path_for(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:08d}.pt")


def all_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    found = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt")) if PATTERN.search(p)]
    return sorted(found, key=lambda p: int(PATTERN.search(p).group(1)))


def latest(out_dir):
    found = all_checkpoints(out_dir)
    return found[-1] if found else None


def save(obj, out_dir, step, keep_last, keep_step=None):
    """Write obj as out_dir/ckpt-<step>.pt atomically, then keep only the newest keep_last checkpoints and that of
    keep_step, if any. A SaveError when the write fails: the partial file removed, the earlier checkpoints kept."""
    os.makedirs(out_dir, exist_ok=True)
    path = path_for(out_dir, step)
    tmp = path + ".tmp"
    compute_crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # the per-record checksums that load() verifies
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    except (OSError, RuntimeError) as e:  # a full disk surfaces as torch's RuntimeError from its zip writer
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise SaveError(save_failure(e, path, tensor_bytes(obj), keep_last)) from None
    finally:
        torch.serialization.set_crc32_options(compute_crc32)
    atomic_write.replace(tmp, path)  # readers see the old set of files or the new one, never half a file
    kept = path_for(out_dir, keep_step) if keep_step is not None else None
    for old in all_checkpoints(out_dir)[:-keep_last]:
        if old != kept:
            os.remove(old)
    remove_partial_files(out_dir)
    return path


def save_failure(error, path, needed, keep_last):
    """The message of a failed save: for a full disk the bytes needed and free, and the ways out."""
    out_dir = os.path.dirname(path) or "."
    free = shutil.disk_usage(out_dir).free
    last = latest(out_dir)
    resume = f"it resumes from {last}" if last else "it starts afresh: no checkpoint was written before"
    causes = [error, error.__context__, error.__cause__]  # torch's zip writer may wrap the OSError
    if any(getattr(c, "errno", None) == errno.ENOSPC for c in causes) or free < needed:
        return (f"no space left on the device for checkpoint {path}: it needs about {gb(needed)} and the disk "
                f"holding {out_dir} has {gb(free)} free. Free space there, give another --out_dir, or keep fewer "
                f"checkpoints (--keep_last={keep_last} now), then rerun the same command: {resume}.")
    return (f"cannot write checkpoint {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            f". The partial file is removed; rerun the same command when {out_dir} is writable: {resume}.")


def gb(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def tensor_bytes(obj):
    """Bytes of every tensor in a nest of dicts, lists and tuples: about a checkpoint's size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def expected_bytes(model, optimizer):
    """About the size of this run's checkpoints, known before the first step: the full weights (model.parameters()
    yields a tied weight once; a DTensor's numel is the full one) and the optimizer state they will have after it
    (optim.full_state_bytes)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + optim.full_state_bytes(optimizer)


def space_warning(out_dir, checkpoint_bytes, keep_last, keep_best):
    """A warning when the disk holding out_dir cannot hold the checkpoints a run keeps there at once (keep_last, the
    one being written, and the best with keep_best), the checkpoints already there counted as space (rotation
    replaces them); None when it can."""
    at_once = keep_last + 1 + bool(keep_best)
    there = sum(os.path.getsize(p) for p in all_checkpoints(out_dir))
    free = shutil.disk_usage(out_dir).free
    if free + there >= at_once * checkpoint_bytes:
        return None
    return (f"warning: the disk holding {out_dir} has {gb(free)} free" + (f" (and {gb(there)} in checkpoints there)"
            if there else "") + f", but this run's checkpoints take about {gb(checkpoint_bytes)} each and up to "
            f"{at_once} are there at once (keep_last={keep_last}, the one being written"
            + (", the best" if keep_best else "") + f"): {gb(at_once * checkpoint_bytes)}. Free space, give another "
            f"--out_dir or a smaller --keep_last, or a save will stop the run when the disk is full.")


def remove_partial_files(out_dir):
    """Delete the ckpt-*.pt.tmp files that a save stopped mid-write left (nothing reads them); returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt.tmp"))
    for path in stale:
        os.remove(path)
    return stale


def find(out_dir, ckpt_path="", flag="--ckpt_path"):
    """The checkpoint to read: ckpt_path, or out_dir's newest when it is ''; 'best' (the best of out_dir) or DIR/best
    (the best of DIR) is the checkpoint of the lowest mean validation loss that keep_best kept. A CheckpointError
    names what is missing (and the setting, flag, that asked for it) and what to give instead."""
    if ckpt_path == "best" or (os.path.basename(ckpt_path) == "best" and not os.path.exists(ckpt_path)):
        return best(os.path.dirname(ckpt_path) or out_dir)
    if ckpt_path:
        if os.path.isfile(ckpt_path):
            return ckpt_path
        folder = os.path.dirname(ckpt_path) or "."
        near = latest(folder) if os.path.isdir(folder) else None
        raise CheckpointError(f"{flag}={ckpt_path} does not exist; " + (
            f"the newest checkpoint there is {near}" if near else
            "give the path of a ckpt-NNNNNNNN.pt file, DIR/best, or --out_dir=DIR to take the newest checkpoint in DIR"))
    path = latest(out_dir)
    if not path:
        raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {out_dir}; train first, e.g. python train.py "
                              f"config/smoke.py")
    return path


def best(out_dir):
    """The checkpoint of the lowest mean validation loss of the run in out_dir, as its newest checkpoint records it
    (read without its tensors: they are mapped, not loaded)."""
    newest = latest(out_dir)
    if not newest:
        raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {out_dir}, so no best one; train first, with "
                              f"--keep_best=True")
    try:
        record = torch.load(newest, map_location="cpu", weights_only=True, mmap=True).get("best")
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {newest}: {type(e).__name__}: {e}") from None
    if not record:
        raise CheckpointError(f"the run in {out_dir} recorded no best checkpoint (it trained without --keep_best=True "
                              f"or before its first evaluation); give a checkpoint path, e.g. {newest}")
    path = path_for(out_dir, record["step"])
    if not os.path.isfile(path):
        raise CheckpointError(f"the best checkpoint of {out_dir}, {path} (step {record['step']}, mean val loss "
                              f"{record['val_loss']:.4f}), is gone: it was rotated away or deleted")
    return path


def to_resume(out_dir, init_from):
    """The checkpoint a run with init_from ('auto' | 'resume' | 'scratch') continues in out_dir, or None to start
    afresh; a CheckpointError when init_from and out_dir disagree."""
    path = latest(out_dir)
    if init_from == "resume" and path is None:
        raise CheckpointError(f"init_from='resume' but {out_dir} has no checkpoint (ckpt-*.pt); use "
                              f"--init_from=scratch or auto")
    if init_from == "scratch" and path:
        raise CheckpointError(f"init_from='scratch' but {out_dir} already holds checkpoints (newest {path}): a new run "
                              f"there would mix with them. Use another --out_dir, or delete them (or --init_from=auto "
                              f"to continue that run)")
    return path


def check_resumable(ckpt, path, model_config, cfg, world_size, weights_only=False):
    """Raise a CheckpointError when a run of model_config and settings cfg on world_size ranks cannot continue from
    ckpt (read from path), or, with weights_only, cannot start from its weights."""
    wanted = dataclasses.asdict(model_config)
    # Runtime choices that leave the weights' shapes and meaning alone: the attention kernel, the head+loss chunking,
    # and the attention spans, block_size and short_window (which follows block_size by default): every family uses
    # RoPE, no learned position table, positions are computed for any length.
    differ = [f"{k}: checkpoint {v!r}, this run {wanted.get(k)!r}" for k, v in ckpt["model_config"].items()
              if k not in ("attn_impl", "loss_chunk_size", "block_size", "short_window") and wanted.get(k) != v]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} holds a different model:\n  " + "\n  ".join(differ) + "\n"
            "Give the same model settings as the run that wrote it (e.g. the same config file), or train a new model "
            "with --init_from=scratch and another --out_dir.")
    if weights_only:
        return
    # parallel ('ddp' | 'fsdp') and param_dtype may change: checkpoints hold the full state, cast on load
    theirs = ckpt["config"]["optimizer"]
    if theirs != cfg["optimizer"]:
        raise CheckpointError(f"checkpoint {path} holds {theirs} state and this run asks for "
                              f"--optimizer={cfg['optimizer']}; keep --optimizer={theirs}, or start a new run from its "
                              f"weights only: --init_weights={path} --out_dir=NEW_DIR.")
    if cfg["restore_data_state"] and ckpt["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {ckpt['world_size']} ranks and this run has {world_size}: the data "
            f"positions are per rank. Relaunch with {ckpt['world_size']} ranks, or pass --restore_data_state=False to "
            f"keep the weights, optimizer and schedule but start the data streams afresh.")


def verify(path):
    """Check every record of the checkpoint's zip archive against the CRC32 stored when it was written."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its CRC32 check: the file changed on disk after it was written")


def load(path):
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        verify(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or overwritten bytes, not a checkpoint, or objects weights_only refuses
        raise SystemExit(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Move it away to resume from the previous checkpoint in {os.path.dirname(path) or '.'}."
        ) from None


def load_model(path, attn_impl):
    """(Transformer with the checkpoint's weights in eval mode on the CPU, the checkpoint without its model and
    optimizer entries), run with attn_impl (how attention runs is no part of the weights). A SystemExit naming the
    file when the checkpoint's settings or weights do not fit this model.py."""
    ckpt = load(path)
    unknown = sorted(set(ckpt["model_config"]) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"checkpoint {path} has model settings this model.py does not know ({', '.join(unknown)}); "
                         f"use the code that wrote it")
    try:
        model = Transformer(ModelConfig(**{**ckpt["model_config"], "attn_impl": attn_impl}))
    except (ValueError, RuntimeError, ImportError) as e:  # e.g. attn_impl='flash_attention_2' with no GPU
        raise SystemExit(f"cannot build the model of checkpoint {path}: {e}") from None
    mismatch = weights_mismatch(model, ckpt["model"])
    if mismatch:  # same settings, other parameters: model.py changed since the checkpoint
        raise SystemExit(f"checkpoint {path} does not fit this model.py: {mismatch}; use the code that wrote it")
    model.load_state_dict(ckpt["model"])
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}


def weights_mismatch(model, state):
    """Why the weights `state` do not load into model, in one line (the first few names of each kind), or ''."""
    ours = model.state_dict()

    def some(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    reshaped = [f"{k} {list(state[k].shape)} (here {list(v.shape)})" for k, v in ours.items()
                if k in state and state[k].shape != v.shape]
    return "; ".join(f"{what} {some(names)}" for what, names in [("no weights for", missing),
                     ("weights this model has no place for:", unexpected), ("other shapes:", reshaped)] if names)


def fingerprint(tensors):
    """A short hash of the tensors' bytes: two runs (or a run and its resume) hold the same bits where it is equal
    (train.py's log_checksums)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state(cuda):
    """This process's RNG states as tensors and plain values, so that the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None,
            "python": list(random.getstate()),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(rng, cuda):
    torch.set_rng_state(rng["torch"])
    if cuda and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
