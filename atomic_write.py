"""
Crash-safe file replacement, shared by prepare.py (token shards, meta.json) and checkpoint.py (checkpoints).

    atomic_write.replace(tmp, path)   rename a finished, fsynced tmp file onto path, then fsync the directory

os.replace is atomic (readers see the old file or the new one, never half a file), but the rename itself is only an
entry in the directory: until the directory is fsynced, a power cut can lose it and leave the old state on disk.
"""
import os


def replace(tmp, path):
    """os.replace(tmp, path), then fsync path's directory so that the rename survives a power cut."""
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
