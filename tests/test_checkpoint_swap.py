"""A sharded checkpoint's swap stopped between its two renames, or while it deletes the old checkpoint:
``ckpt_path="last"`` still resumes from a complete checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_power.strategies import FSDPStrategy
from tests.helpers.strategies import AdamBoringModel, sharded_fsdp_trainer


class Killed(Exception):
    """Stands for a SIGKILL at the moment it is raised."""


class StartStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def resume_from_last(folder: Path) -> tuple[StartStep, pl.Trainer]:
    """Fit to step 4 from ``ckpt_path="last"`` in ``folder``, saving ``last.ckpt`` there again."""
    start = StartStep()
    resumed = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=FSDPStrategy(state_dict_type="sharded"),
        max_steps=4,
        callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0), start],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    resumed.fit(AdamBoringModel(), ckpt_path="last")
    return start, resumed


def test_last_resumes_from_the_checkpoint_a_stopped_swap_left_aside(tmp_path, in_process_group, monkeypatch):
    first = sharded_fsdp_trainer(tmp_path, max_steps=2)
    first.fit(AdamBoringModel())
    first.save_checkpoint(tmp_path / "last.ckpt")
    rename = Path.rename

    def killed_before_the_new_checkpoint_moves_in(self, target):
        if self.name.endswith(".partial"):
            raise Killed
        return rename(self, target)

    with monkeypatch.context() as patch:  # a second save of last.ckpt, killed between the swap's two renames
        patch.setattr(Path, "rename", killed_before_the_new_checkpoint_moves_in)
        with pytest.raises(Killed):
            first.save_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()  # the old one is aside, the new one staged

    start, resumed = resume_from_last(tmp_path)
    assert start.step == 2 and resumed.global_step == 4  # resumed at step 2, not restarted from 0
    # Saving last.ckpt again put the new one in place and only then dropped the one set aside (and the stale staging).
    assert sorted(path.name for path in tmp_path.iterdir() if "ckpt" in path.name) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / ".metadata").is_file()


def test_a_kill_while_the_old_checkpoint_is_deleted_leaves_last_resumable(tmp_path, in_process_group, monkeypatch):
    first = sharded_fsdp_trainer(tmp_path, max_steps=2)
    first.fit(AdamBoringModel())
    first.save_checkpoint(tmp_path / "last.ckpt")

    def killed_mid_delete(path, *args, **kwargs):  # deleting a folder takes one file after another
        (Path(path) / ".metadata").unlink()
        raise Killed

    with monkeypatch.context() as patch:  # a second save of last.ckpt, killed while it deletes the first
        patch.setattr(shutil, "rmtree", killed_mid_delete)
        with pytest.raises(Killed):
            first.save_checkpoint(tmp_path / "last.ckpt")
    # The partly deleted folder was touched last, so under a name that matched last*.ckpt "last" would pick it
    assert sorted(path.name for path in tmp_path.iterdir() if "ckpt" in path.name) == [
        "last.ckpt",
        "last.old.ckpt.deleting",
    ]
    start, resumed = resume_from_last(tmp_path)
    assert start.step == 2 and resumed.global_step == 4
