"""
Checkpoint files of a run: `out_dir/ckpt-NNNNNNNN.pt`, NNNNNNNN being the optimizer step. Used by train.py and sample.py.

    save(obj, out_dir, step, keep_last)  torch.save to ckpt-NNNNNNNN.pt.tmp, fsync, rename; then delete all but the
                                         newest keep_last. A crash mid-save, even kill -9, leaves only a .tmp file,
                                         which nothing reads, and the previous checkpoints intact.
    latest(out_dir) -> path or None      the newest complete checkpoint
    load(path) -> dict                   torch.load(mmap=True, weights_only=True) on the CPU, or one clear error: the
                                         tensors stay in the file's page cache, so the ranks of a node share one copy
                                         instead of each reading the whole checkpoint into its own memory

A checkpoint holds only tensors, plain containers, numbers and strings, so it loads with weights_only=True.
"""

import glob
import os
import re

import torch

PATTERN = re.compile(r"ckpt-(\d{8})\.pt$")


def path_for(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:08d}.pt")


def all_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    found = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt")) if PATTERN.search(p)]
    return sorted(found, key=lambda p: int(PATTERN.search(p).group(1)))


def latest(out_dir):
    found = all_checkpoints(out_dir)
    return found[-1] if found else None


def save(obj, out_dir, step, keep_last):
    """Write obj as out_dir/ckpt-<step>.pt atomically, then keep only the newest keep_last checkpoints."""
    os.makedirs(out_dir, exist_ok=True)
    path = path_for(out_dir, step)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)  # atomic on POSIX: readers see the old set of files or the new one, never half a file
    _fsync_dir(out_dir)
    for old in all_checkpoints(out_dir)[:-keep_last]:
        os.remove(old)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt.tmp")):  # left by a crash mid-save
        os.remove(stale)
    return path


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated file, not a checkpoint, or objects weights_only refuses
        raise SystemExit(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Move it away to resume from the previous checkpoint in {os.path.dirname(path) or '.'}."
        ) from None
