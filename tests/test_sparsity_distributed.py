"""The monitor on 2 CPU processes (gloo): FSDP1 flat views (uneven and empty shards), FSDP2 DTensors, and DDP.

A subprocess job runs this file as a script (Lightning relaunches it once per extra rank). The ``shards`` job:

1. FSDP1 (``lightning_power.strategies.FSDPStrategy``, which runs on CPU) for 4 steps, with a checkpoint at step 3,
   between two checks;
2. FSDP1 resumed from that checkpoint to step 6, writing the masks; then a final full checkpoint;
3. FSDP2 (``ModelParallelStrategy``) for 6 steps, writing the masks;
4. FSDP1 for 3 steps with the step-3 checkpoint of 1. as ``reference``: each rank slices its shards out of it;
5. FSDP1 ``NO_SHARD`` for 2 steps: whole replicas, counted once as under DDP;
6. FSDP2 for 2 steps with a parameter left out of ``fully_shard``: a replica, counted once;
7. ``shard_layout`` of parameters sharded over two different process groups;
8. FSDP1 for 1 step, with the disk full while rank 0 writes the second parameter's mask.

Rank 0 writes what it saw to JSON; the test checks it against SlidingColumns' exact ground truth. The ``ddp_resume``
job resumes a 1-process checkpoint under DDP on 2 processes (an unsharded run: every rank reads rank 0's snapshots).
"""

from __future__ import annotations

import errno
import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.versions import cpu_fsdp1_full_checkpoint, cpu_fsdp2
from tests.test_sparsity_monitor import (
    FROZEN,
    HIDDEN,
    N_COLUMNS,
    N_PARAMS,
    SlidingColumns,
    assert_history,
    columns_moved,
    expected_history,
    expected_metrics,
)


class WithReplicatedOffset(SlidingColumns):
    """SlidingColumns whose ``offset`` (4 elements) FSDP2 leaves whole on every rank (``ignored_params``). Its loss
    term does not depend on the rank's data, so the replicas take the same steps: every element moves at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + (self.offset - 1).square().sum()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for module in (self.first, self.second, self.frozen):
            fully_shard(module, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"], ignored_params={self.offset})


def run_job(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_power.sparsity import UpdateSparsityMonitor
    from lightning_power.strategies import FSDPStrategy  # Lightning's, usable on CPU

    def fit(strategy, root, max_steps, ckpt_path=None, callbacks=(), model_class=SlidingColumns, **monitor_kwargs):
        torch.manual_seed(0)
        model = model_class()
        monitor = UpdateSparsityMonitor(**{"every_n_steps": 2, **monitor_kwargs})
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
    # The first fit sets up the process group for the whole job: ranks whose collectives fall out of step fail after a
    # minute instead of hanging until the test's timeout.
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, timeout=timedelta(seconds=60))
    _, first = fit(strategy, "fsdp1", 4, callbacks=[checkpoints])
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
    step3 = str(next((out / "ckpt").glob("*step=3*")))
    _, fsdp1_reference = fit(
        FSDPStrategy(auto_wrap_policy={nn.Linear}), "fsdp1-reference", 3, every_n_steps=1, reference=step3
    )
    _, no_shard = fit(FSDPStrategy(auto_wrap_policy={nn.Linear}, sharding_strategy="NO_SHARD"), "no-shard", 2)
    _, replicated = fit(
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        "fsdp2-replicated",
        2,
        model_class=WithReplicatedOffset,
    )
    two_groups = different_process_groups_error()
    masks_errors = disk_full_while_writing_masks(fit, FSDPStrategy(auto_wrap_policy={nn.Linear}))
    if trainer.is_global_zero:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "fsdp1": first.history,
                    "fsdp1_resumed": resumed.history,
                    "fsdp2": fsdp2.history,
                    "rank0_shards": shards,
                    "files": sorted(p.name for p in (out / "fsdp1" / "update_sparsity").iterdir()),
                    "fsdp1_reference": fsdp1_reference.history,
                    "no_shard": no_shard.history,
                    "replicated": replicated.history,
                    "two_groups": two_groups,
                    "masks_errors": masks_errors,
                    "masks_left": [
                        p.name for p in (out / "disk-full" / "update_sparsity").iterdir() if "masks" in p.name
                    ],
                }
            )
        )


def different_process_groups_error() -> str | None:
    """``shard_layout`` of a module with one parameter sharded over both ranks, one over each rank alone (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lightning_power.distributed import shard_layout

    both = init_device_mesh("cpu", (2,))
    hybrid = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    module = nn.Module()
    module.a = nn.Parameter(distribute_tensor(torch.zeros(4, 2), both, [Shard(0)]))
    module.b = nn.Parameter(distribute_tensor(torch.zeros(4, 2), hybrid, [Replicate(), Shard(0)]))
    try:
        shard_layout(module)
    except ValueError as error:
        return str(error)
    return None


def disk_full_while_writing_masks(fit, strategy) -> list[str | None]:
    """Fit with ``save_masks`` while the disk fills up after rank 0 wrote the first parameter's mask: every rank's
    error (gathered to rank 0, which also shows that the ranks' collectives still match)."""
    real_write_array = np.lib.format.write_array
    written = []

    def disk_full_after_one_array(*args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(True)
        real_write_array(*args, **kwargs)

    np.lib.format.write_array = disk_full_after_one_array
    error = None
    try:
        fit(strategy, "disk-full", 1, every_n_steps=1, save_masks=True)
    except OSError as exc:
        error = str(exc)
    finally:
        np.lib.format.write_array = real_write_array
    errors = [None, None]
    torch.distributed.all_gather_object(errors, error)
    return errors


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

    # A reference checkpoint under FSDP1: each rank takes its own shards' slices of it, so at its step nothing moved.
    (step, metrics) = result["fsdp1_reference"][-1]
    assert step == 3
    assert {k: v for k, v in metrics.items() if k != "update_sparsity/since_last"} == {
        "update_sparsity/total": 1.0,
        "update_sparsity/frozen_fraction": pytest.approx(FROZEN / N_PARAMS),
        "update_sparsity/first": 1.0,
        "update_sparsity/second": 1.0,
        "update_sparsity/frozen": 1.0,
    }
    # NO_SHARD keeps whole replicas: counted once, as under DDP.
    assert_history(result["no_shard"], expected_history([2]))
    # A parameter that FSDP2 left whole on every rank is counted once.
    (_, metrics) = result["replicated"][-1]
    unchanged = HIDDEN * (N_COLUMNS - columns_moved(0, 2)) + FROZEN
    assert metrics["update_sparsity/total"] == pytest.approx(unchanged / (N_PARAMS + 4), abs=1e-12)
    assert metrics["update_sparsity/offset"] == 0.0
    assert metrics["update_sparsity/first"] == expected_metrics(2, 0)["update_sparsity/first"]

    assert result["two_groups"] is not None
    assert "parameters are sharded over different process groups (ranks [(0,), (0, 1)])" in result["two_groups"]
    # Disk full in the middle of the masks file: both ranks raise, neither hangs, no partial file is left.
    for error in result["masks_errors"]:
        assert "could not save the masks" in error and "masks-native-step1.npz" in error
        assert "No space left on device" in error
    assert result["masks_left"] == []


if __name__ == "__main__":
    torch.set_num_threads(1)
    JOBS[sys.argv[1]](Path(sys.argv[2]))
