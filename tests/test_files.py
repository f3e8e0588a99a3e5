"""Atomic writes: file permissions without touching the process umask, and checkpoints written beside their target."""

import os
import re
import secrets

import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_power.cli import LightningPowerCLI
from lightning_power.files import atomic_write, write_atomically
from lightning_power.strategies import AtomicCheckpointIO, replace_path, use_atomic_checkpoint_io
from tests.helpers.jobs import CONFIGS
from tests.helpers.strategies import AdamBoringModel, sharded_fsdp_trainer
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


def _fails_midway(f):
    f.write(b"half")
    raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match=r"cannot write '.*table\.csv': \[Errno 28\] No space left") as raised:
        atomic_write(target, _fails_midway)
    assert isinstance(raised.value.__cause__, OSError)
    assert os.listdir(tmp_path) == ["table.csv"] and target.read_bytes() == b"old"


def test_an_error_in_write_is_raised_unchanged_without_a_temporary_file(tmp_path):
    def broken(f):
        raise ValueError("not serializable")

    with pytest.raises(ValueError, match="not serializable"):
        atomic_write(tmp_path / "out.json", broken)
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_created_is_an_os_error_naming_the_file(tmp_path):
    (tmp_path / "runs").write_text("a file, not a folder")
    with pytest.raises(OSError, match=r"cannot write '.*runs/a/out\.json'"):
        write_atomically(tmp_path / "runs" / "a" / "out.json", "{}")


def test_atomic_write_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(target, b"12345")
    assert synced == [(5, False)]  # the whole content, synced while the target did not exist yet


def test_atomic_write_never_writes_through_a_file_planted_at_its_temporary_name(tmp_path, monkeypatch):
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * (2 * n))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / f".out.bin.{'0' * 16}.tmp").symlink_to(victim)
    with pytest.raises(OSError, match=r"cannot write '.*out\.bin'"):
        write_atomically(tmp_path / "out.bin", b"new")
    assert victim.read_text() == "keep me" and not (tmp_path / "out.bin").exists()


def test_atomic_checkpoint_io_refuses_storage_options_instead_of_ignoring_them(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "x.ckpt", storage_options={"acl": "private"})
    assert not (tmp_path / "x.ckpt").exists()


class MyCheckpointIO(TorchCheckpointIO):
    pass


@pytest.mark.parametrize("wrapped", [False, True])
def test_use_atomic_checkpoint_io_leaves_a_users_own_checkpoint_io_alone(wrapped):
    mine = MyCheckpointIO()
    strategy = SingleDeviceStrategy("cpu", checkpoint_io=AsyncCheckpointIO(mine) if wrapped else mine)
    use_atomic_checkpoint_io(strategy)
    io = strategy.checkpoint_io
    assert (io.checkpoint_io if wrapped else io) is mine


def test_use_atomic_checkpoint_io_replaces_lightnings_default():
    strategy = SingleDeviceStrategy("cpu", checkpoint_io=TorchCheckpointIO())
    use_atomic_checkpoint_io(strategy)
    assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_swap_replaces_a_dangling_last_ckpt_symlink(tmp_path):
    """ModelCheckpoint(save_last="link") may leave last.ckpt linked to a checkpoint that was deleted since."""
    (tmp_path / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")
    staging = tmp_path / "last.ckpt.partial"
    staging.mkdir()
    (staging / "meta.pt").write_bytes(b"step 3")
    replace_path(staging, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"step 3"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_sharded_save_drops_the_partial_folder_a_killed_save_left(tmp_path, in_process_group):
    trainer = sharded_fsdp_trainer(tmp_path, max_steps=1)
    trainer.fit(AdamBoringModel())
    stale = tmp_path / "last.ckpt.partial"
    stale.mkdir()
    (stale / "__1_0.distcp").write_bytes(b"a shard of a killed 2-process save")
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert sorted(path.name for path in tmp_path.iterdir() if "ckpt" in path.name) == ["last.ckpt"]
    assert not (tmp_path / "last.ckpt" / "__1_0.distcp").exists()
    assert (tmp_path / "last.ckpt" / ".metadata").is_file()


def test_fsdp1_on_cpu_with_older_torch_still_trains_with_sharded_checkpoints(monkeypatch, tmp_path, in_process_group):
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.13.0+cpu"))
    trainer = sharded_fsdp_trainer(tmp_path, max_steps=2)
    trainer.fit(AdamBoringModel())
    assert trainer.global_step == 2
