"""Atomic writes: file permissions without touching the process umask, and checkpoints written beside their target."""

import os
import re

import pytest
import torch

from lightning_power.cli import LightningPowerCLI
from lightning_power.files import atomic_write
from lightning_power.strategies import AtomicCheckpointIO
from tests.helpers.jobs import CONFIGS
from tests.helpers.tiny import tiny_cli_args


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_open_gives_and_leaves_the_umask_alone(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
        assert os.umask(umask) == umask  # atomic_write never changed it
    finally:
        os.umask(previous)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


class ListsFolderWhilePickled:
    """Records the files in the checkpoint's folder while ``torch.save`` pickles it, mid-write."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        ListsFolderWhilePickled.seen = sorted(os.listdir(self.folder))
        return (str, ("written",))


def test_atomic_checkpoint_io_writes_beside_the_checkpoint_then_renames(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state": torch.ones(3)}, target)
    io.save_checkpoint({"state": torch.zeros(3), "probe": ListsFolderWhilePickled(target.parent)}, target)
    seen = ListsFolderWhilePickled.seen  # the old checkpoint, and the new one being written next to it
    assert "last.ckpt" in seen and len(seen) == 2
    assert re.fullmatch(r"\.last\.ckpt\.[0-9a-f]{16}\.tmp", min(seen)), seen
    assert os.listdir(target.parent) == ["last.ckpt"]
    loaded = io.load_checkpoint(target, weights_only=False)  # the probe unpickles through str()
    assert torch.equal(loaded["state"], torch.zeros(3)) and loaded["probe"] == "written"


def test_the_cli_writes_checkpoints_with_atomic_checkpoint_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LightningPowerCLI(args=["--config", str(CONFIGS / "gpt_demo.yaml"), *tiny_cli_args(max_steps=1)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_atomic_checkpoint_io_takes_file_urls_as_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    AtomicCheckpointIO().save_checkpoint({"step": 3}, f"file://{tmp_path}/ckpt/x.ckpt")
    assert (tmp_path / "ckpt" / "x.ckpt").is_file() and not (tmp_path / "file:").exists()


def test_the_cli_puts_atomic_checkpoint_io_inside_async_checkpoint_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "gpt_demo.yaml"), *tiny_cli_args(max_steps=1)]
    cli = LightningPowerCLI(args=[*args, "--trainer.plugins=lightning.pytorch.plugins.io.AsyncCheckpointIO"], run=False)
    io = cli.trainer.strategy.checkpoint_io
    assert type(io).__name__ == "AsyncCheckpointIO" and isinstance(io.checkpoint_io, AtomicCheckpointIO)
