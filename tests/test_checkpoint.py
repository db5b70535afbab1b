"""checkpoint.py: checksums verified on load, clear errors for missing and damaged files; atomic_write.py's renames."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import optim  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def small_state():
    """A state shaped like train.py's: model weights, AdamW state after one step, plain numbers."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, n_layer=2, n_head=2, d_model=32, block_size=16))
    opt = optim.make_optimizer(model, "adamw", "float32", 1e-3, (0.9, 0.95), 0.1, 0, "cpu")
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "tokens_seen": 32}


def test_overwritten_bytes_are_an_error_not_nan_weights(tmp_path):
    path = checkpoint.save(small_state(), str(tmp_path), step=1, keep_last=2)
    assert checkpoint.load(path)["step"] == 1
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # 8 bytes in the middle of the file become 0xff: NaN where they land in a tensor
        f.seek(size // 2)
        f.write(b"\xff" * 8)
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*ckpt-00000001\.pt: ValueError: record .* fails "
                                         r"its CRC32 check: the file changed on disk") as e:
        checkpoint.load(path)
    assert "Move it away to resume from the previous checkpoint" in str(e.value)


def test_truncated_and_missing_checkpoints(tmp_path):
    path = checkpoint.save(small_state(), str(tmp_path), step=2, keep_last=2)
    with pytest.raises(SystemExit, match=r"checkpoint .*ckpt-00000009\.pt does not exist$"):
        checkpoint.load(str(tmp_path / "ckpt-00000009.pt"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*ckpt-00000002\.pt"):
        checkpoint.load(path)


def test_checksums_are_written_whatever_the_global_option(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = checkpoint.save(small_state(), str(tmp_path), step=3, keep_last=2)
    finally:
        torch.serialization.set_crc32_options(True)
    assert checkpoint.load(path)["tokens_seen"] == 32
