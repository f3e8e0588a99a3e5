"""The monitor on 2 CPU processes (gloo): FSDP1 flat views (uneven and empty shards), FSDP2 DTensors, and DDP.

A subprocess job runs this file as a script (Lightning relaunches it once per extra rank). The ``shards`` job:

1. FSDP1 (``lightning_power.strategies.FSDPStrategy``, which runs on CPU) for 4 steps, with a checkpoint at step 3,
   between two checks;
2. FSDP1 resumed from that checkpoint to step 6, writing the masks; then a final full checkpoint;
3. FSDP2 (``ModelParallelStrategy``) for 6 steps, writing the masks.

Rank 0 writes what it saw to JSON; the test checks it against SlidingColumns' exact ground truth. The ``ddp_resume``
job resumes a 1-process checkpoint under DDP on 2 processes (an unsharded run: every rank reads rank 0's snapshots).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.versions import cpu_fsdp1_full_checkpoint, cpu_fsdp2
from tests.test_sparsity_monitor import HIDDEN, N_COLUMNS, SlidingColumns, assert_history, expected_history


def run_job(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_power.sparsity import UpdateSparsityMonitor
    from lightning_power.strategies import FSDPStrategy  # Lightning's, usable on CPU

    def fit(strategy, root, max_steps, ckpt_path=None, callbacks=(), **monitor_kwargs):
        torch.manual_seed(0)
        model = SlidingColumns()
        monitor = UpdateSparsityMonitor(every_n_steps=2, **monitor_kwargs)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=max_steps,
            callbacks=[*callbacks, monitor],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            default_root_dir=out / root,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, monitor

    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _, first = fit(FSDPStrategy(auto_wrap_policy={nn.Linear}), "fsdp1", 4, callbacks=[checkpoints])
    shards = {}
    if torch.distributed.get_rank() == 0:  # the shard sizes this test relies on: uneven, one empty
        shards = {p.name: p.local().numel() for p in first._checker.parts}
    trainer, resumed = fit(
        FSDPStrategy(auto_wrap_policy={nn.Linear}),
        "fsdp1-resumed",
        6,
        ckpt_path=next((out / "ckpt").glob("*step=3*")),
        save_masks=True,
        rank_every_n_checks=3,
    )
    trainer.save_checkpoint(out / "final.ckpt")
    _, fsdp2 = fit(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "fsdp2", 6, save_masks=True)
    if trainer.is_global_zero:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "fsdp1": first.history,
                    "fsdp1_resumed": resumed.history,
                    "fsdp2": fsdp2.history,
                    "rank0_shards": shards,
                    "files": sorted(p.name for p in (out / "fsdp1" / "update_sparsity").iterdir()),
                }
            )
        )


def run_ddp_resume_job(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_power.sparsity import UpdateSparsityMonitor

    torch.manual_seed(0)
    monitor = UpdateSparsityMonitor(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        callbacks=[ModelCheckpoint(dirpath=out / "ckpt-ddp", every_n_train_steps=5, save_top_k=-1), monitor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out / "ddp",
    )
    trainer.fit(SlidingColumns(), ckpt_path=next((out / "ckpt").glob("*step=3*")))
    (out / f"ddp-rank{trainer.global_rank}.json").write_text(json.dumps(monitor.history))


JOBS = {"shards": run_job, "ddp_resume": run_ddp_resume_job}


@pytest.mark.distributed
def test_unsharded_run_resumes_on_another_number_of_processes(tmp_path):
    """1 process -> DDP on 2 processes -> 1 process, each time between two checks (since-last snapshot from a file)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_power.sparsity import UpdateSparsityMonitor
    from tests.helpers.jobs import run
    from tests.test_sparsity_monitor import fit, fresh_model

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path / "one", max_steps=3, callbacks=[checkpoints])
    run([sys.executable, __file__, "ddp_resume", str(tmp_path)], cwd=tmp_path, timeout=600)
    for rank in (0, 1):  # every rank logs the same numbers
        assert_history(json.loads((tmp_path / f"ddp-rank{rank}.json").read_text()), expected_history([2, 4, 6]))
    files = sorted(p.name for p in (tmp_path / "one" / "update_sparsity").glob("*.pt"))
    assert [f.split("-")[0] for f in files] == ["reference", "since_last", "since_last"]  # steps 2 and 4, by rank 0
    assert all(f.endswith("-rank0-of-1.pt") for f in files)  # named after the run that started them
    resumed = UpdateSparsityMonitor(every_n_steps=2)
    fit(fresh_model(), resumed, tmp_path / "again", max_steps=6, ckpt_path=next((tmp_path / "ckpt-ddp").glob("*")))
    assert_history(resumed.history, expected_history([2, 4, 6]))


@pytest.mark.distributed
@cpu_fsdp1_full_checkpoint
@cpu_fsdp2
def test_fsdp1_and_fsdp2_two_processes(tmp_path):
    from lightning_power.sparsity import MaskFile
    from lightning_power.sparsity.rank import update_rank
    from tests.helpers.jobs import run

    run([sys.executable, __file__, "shards", str(tmp_path)], cwd=tmp_path, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["rank0_shards"]["first.bias"] == 0  # FSDP1 split first's 108 flat elements 54/54: bias on rank 1
    assert result["rank0_shards"]["first.weight"] == 54
    assert_history(result["fsdp1"], expected_history([2, 4]))
    assert_history(result["fsdp1_resumed"], expected_history([2, 4, 6]))
    assert result["fsdp1_resumed"][:1] == result["fsdp1"][:1]
    assert_history(result["fsdp2"], expected_history([2, 4, 6]))
    files = result["files"]
    assert sum(f.startswith("reference-") for f in files) == 2 and any("rank1-of-2" in f for f in files)
    assert sum(f.startswith("since_last-") and "-step2-" in f for f in files) == 2

    # Whole-parameter masks gathered from shards: columns 0..6 of first.weight moved, column 7 never did.
    expected_first = np.zeros((HIDDEN, N_COLUMNS), dtype=bool)
    expected_first[:, :7] = True
    for run_dir in ("fsdp1-resumed", "fsdp2"):
        masks = MaskFile.open(next((tmp_path / run_dir / "update_sparsity").glob("masks-native-step6.npz")))
        assert np.array_equal(masks.unpacked("first.weight"), expected_first)
        assert masks.unpacked("first.bias").all() and masks.unpacked("second.weight").all()
        assert not masks.unpacked("frozen.weight").any()

    # Update rank at step 6 (the 3rd check), from matrices assembled over the shards, against the weights themselves.
    torch.manual_seed(0)
    initial = SlidingColumns().state_dict()
    final = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    rank_metrics = result["fsdp1_resumed"][-1][1]
    for name in ("first.weight", "second.weight", "frozen.weight"):
        fraction, stable = update_rank(final[name].float() - initial[name].float())
        assert rank_metrics[f"update_rank/{name}"] == fraction
        assert rank_metrics[f"update_stable_rank/{name}"] == pytest.approx(stable, rel=1e-5)
    assert rank_metrics["update_rank/frozen.weight"] == 0.0


if __name__ == "__main__":
    torch.set_num_threads(1)
    JOBS[sys.argv[1]](Path(sys.argv[2]))
