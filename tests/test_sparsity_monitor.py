"""UpdateSparsityMonitor in real single-process fits, against ground truth built into the models."""

from __future__ import annotations

import errno
import math
import os
import shutil
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_power.sparsity import MaskFile, UpdateSparsityMonitor
from lightning_power.sparsity.rank import update_rank
from tests.helpers.jobs import read_metrics

N_COLUMNS, HIDDEN = 8, 12
N_PARAMS = (8 * 12 + 12) + (12 * 5 + 5) + (5 * 3 + 3)  # first, second, frozen = 191
FROZEN = 5 * 3 + 3


class SlidingColumns(pl.LightningModule):
    """Ground truth: at optimizer step ``s`` only input columns ``s-1, s, s+1`` are non-zero.

    So exactly those columns of ``first.weight`` get a gradient (the others get exact zeros and, with Adam without
    momentum (beta1 = 0), an exactly zero step), every other trainable element moves at every step, and ``frozen``
    never trains. The data is a function
    of the step, so a resumed run sees the same batches. Under ``ModelParallelStrategy`` it shards itself (FSDP2).
    """

    data_seed = 1000  # the data's values (not which columns are active): branches of one checkpoint differ in it

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(N_COLUMNS, HIDDEN)
        self.second = nn.Linear(HIDDEN, 5)
        self.frozen = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        step = self.global_step
        generator = torch.Generator().manual_seed(self.data_seed + 10 * step + self.global_rank)
        inputs, targets = torch.randn(4, N_COLUMNS, generator=generator), torch.randn(4, 3, generator=generator)
        active = torch.zeros(N_COLUMNS)
        active[max(step - 1, 0) : step + 2] = 1.0
        inputs, targets, active = (x.to(self.device, self.dtype) for x in (inputs, targets, active))
        outputs = self.frozen(torch.tanh(self.second(torch.tanh(self.first(inputs * active)))))
        return F.mse_loss(outputs, targets)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.01, betas=(0.0, 0.999))

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for module in (self.first, self.second, self.frozen):
            fully_shard(module, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])
        self._sharded = True


def columns_moved(since: int, until: int) -> int:
    """Columns of ``first.weight`` that steps ``since .. until - 1`` moved."""
    return len(set(range(N_COLUMNS)) & set(range(max(since - 1, 0), until + 1)))


def expected_metrics(step: int, previous: int, reference: int = 0) -> dict[str, float]:
    """Exact metrics of SlidingColumns at a check after ``step`` steps, the previous check being at ``previous``."""
    first = (HIDDEN * (N_COLUMNS - columns_moved(reference, step))) / (8 * 12 + 12)
    unchanged = HIDDEN * (N_COLUMNS - columns_moved(reference, step)) + FROZEN
    unchanged_since = HIDDEN * (N_COLUMNS - columns_moved(previous, step)) + FROZEN
    return {
        "update_sparsity/total": unchanged / N_PARAMS,
        "update_sparsity/since_last": unchanged_since / N_PARAMS,
        "update_sparsity/frozen_fraction": FROZEN / N_PARAMS,
        "update_sparsity/first": first,
        "update_sparsity/second": 0.0,
        "update_sparsity/frozen": 1.0,
    }


def expected_history(steps: list[int], reference: int = 0) -> list[tuple[int, dict[str, float]]]:
    previous = [reference, *steps[:-1]]
    return [(s, expected_metrics(s, p, reference)) for s, p in zip(steps, previous)]


def assert_history(history, expected):
    assert [step for step, _ in history] == [step for step, _ in expected]
    for (_, got), (_, want) in zip(history, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key


def fit(
    model, monitor, tmp_path, max_steps, ckpt_path=None, callbacks=(), logger=False, accelerator="cpu", **trainer_kwargs
):
    callbacks = [*callbacks, monitor]
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def fresh_model() -> SlidingColumns:
    torch.manual_seed(0)
    return SlidingColumns()


class ZeroedByHooks(pl.LightningModule):
    """Gradient hooks zero a seeded random set of elements in each trainable parameter; ``frozen`` never trains."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
        self.frozen = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)
        generator = torch.Generator().manual_seed(1)
        self.kept: dict[str, torch.Tensor] = {}
        for name, param in self.body.named_parameters():
            keep = torch.rand(param.shape, generator=generator) > 0.3
            self.kept[f"body.{name}"] = keep
            param.register_hook(lambda grad, keep=keep: grad * keep)

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)
        inputs, targets = torch.randn(8, 6, generator=generator), torch.randn(8, 2, generator=generator)
        return F.mse_loss(self.frozen(self.body(inputs)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)


def test_hooked_zero_gradients_give_exact_sparsity_and_masks(tmp_path):
    torch.manual_seed(0)
    model = ZeroedByHooks()
    monitor = UpdateSparsityMonitor(every_n_steps=1, save_masks=True)
    fit(model, monitor, tmp_path, max_steps=3)
    zeroed = {name: int((~keep).sum()) for name, keep in model.kept.items()}
    n = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.frozen.parameters())
    unchanged = sum(zeroed.values()) + frozen
    assert [step for step, _ in monitor.history] == [1, 2, 3]
    for _, metrics in monitor.history:
        assert metrics["update_sparsity/total"] == pytest.approx(unchanged / n, abs=1e-12)
        assert metrics["update_sparsity/since_last"] == pytest.approx(unchanged / n, abs=1e-12)
        assert metrics["update_sparsity/frozen_fraction"] == pytest.approx(frozen / n, abs=1e-12)
        assert metrics["update_sparsity/body.0"] == pytest.approx(
            (zeroed["body.0.weight"] + zeroed["body.0.bias"]) / 70, abs=1e-12
        )
        assert metrics["update_sparsity/frozen"] == 1.0
    masks = MaskFile.open(tmp_path / "update_sparsity" / "masks-native-step3.npz")
    assert masks.metadata["compare_as"] is None and masks.metadata["step"] == 3
    for name, keep in model.kept.items():
        assert np.array_equal(masks.unpacked(name), keep.numpy())  # changed exactly where the gradient was kept
    assert not masks.unpacked("frozen.weight").any()
    changed = {p["name"]: p["changed"] for p in masks.parameters}
    assert changed["body.2.weight"] == int(model.kept["body.2.weight"].sum())


def test_sliding_columns_ground_truth_with_accumulation_and_csv(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    fit(fresh_model(), monitor, tmp_path, max_steps=6, accumulate_grad_batches=2, logger=logger)
    assert_history(monitor.history, expected_history([2, 4, 6]))
    logged = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [step for step, _ in logged["update_sparsity/total"]] == [2, 4, 6]
    assert logged["update_sparsity/first"][-1][1] == pytest.approx(HIDDEN / 108)
    assert "update_sparsity/total_exact" not in logged  # only with a tolerance
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "update_sparsity/compare_as: None" in hparams and "update_sparsity/atol: 0.0" in hparams


def test_per_layer_off_logs_no_layer_keys(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=1, per_layer=False, since_last=False)
    fit(fresh_model(), monitor, tmp_path, max_steps=2, logger=CSVLogger(tmp_path, name="csv"))
    logged = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert set(logged) == {"update_sparsity/total", "update_sparsity/frozen_fraction"}


class Constant(pl.LightningModule):
    """``loss = sum(w)``: each SGD step moves every weight by exactly ``-lr``; weights start at 1.0."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.w = nn.Parameter(torch.ones(4, 8))

    def training_step(self, batch, batch_idx):
        return self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)


@pytest.mark.parametrize(
    ("compare_as", "atol", "expected_total"),
    [
        (None, 0.0, [0.0, 0.0]),  # fp32 sees every step
        ("bfloat16", 0.0, [1.0, 0.0]),  # 1 - 1e-3 rounds back to 1.0 in bf16; 1 - 2e-3 does not (half ulp 2^-9)
        (None, 1.5e-3, [1.0, 0.0]),  # the tolerance absorbs one step, not two
    ],
)
def test_fp32_update_below_bfloat16_resolution(tmp_path, compare_as, atol, expected_total):
    monitor = UpdateSparsityMonitor(every_n_steps=1, compare_as=compare_as, atol=atol)
    fit(Constant(lr=1e-3), monitor, tmp_path, max_steps=2)
    assert [m["update_sparsity/total"] for _, m in monitor.history] == expected_total
    if atol:
        assert [m["update_sparsity/total_exact"] for _, m in monitor.history] == [0.0, 0.0]


def test_tolerance_applies_to_layers_and_masks_as_to_the_total(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=1, atol=1.5e-3, save_masks=True)
    fit(Constant(lr=1e-3), monitor, tmp_path, max_steps=1)  # every weight moved by 1e-3: within the tolerance
    ((_, metrics),) = monitor.history
    assert metrics["update_sparsity/total"] == metrics["update_sparsity/w"] == 1.0
    assert metrics["update_sparsity/total_exact"] == 0.0
    masks = MaskFile.open(tmp_path / "update_sparsity" / "masks-native-atol0.0015-step1.npz")
    assert masks.metadata["atol"] == 1.5e-3
    assert not masks.unpacked("w").any() and masks.parameters[0]["changed"] == 0


class PoisonAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.w[0, 0] = float("nan")


def test_parameters_that_become_nan_count_as_changed_with_a_warning(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=1, compare_as="bfloat16")
    with pytest.warns(UserWarning, match=r"contain NaN .*\['w'\]"):
        fit(Constant(lr=1e-4), monitor, tmp_path, max_steps=2, callbacks=[PoisonAt(2)])
    assert [m["update_sparsity/total"] for _, m in monitor.history] == [1.0, 1 - 1 / 32]


def test_a_nan_parameter_is_reported_once_also_across_a_resume(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    with pytest.warns(UserWarning, match="contain NaN") as record:
        fit(
            Constant(lr=1e-3),
            UpdateSparsityMonitor(every_n_steps=1),
            tmp_path / "a",
            max_steps=4,
            callbacks=[PoisonAt(2), checkpoints],
        )
    assert sum("contain NaN" in str(w.message) for w in record) == 1  # checks 2, 3 and 4 see the NaN
    monitor = UpdateSparsityMonitor(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*contain NaN.*")
        fit(Constant(lr=1e-3), monitor, tmp_path / "b", max_steps=5, ckpt_path=next((tmp_path / "ckpt").glob("*")))
    assert [step for step, _ in monitor.history] == [1, 2, 3, 4, 5]


class QuantizedFrozen(SlidingColumns):
    """SlidingColumns plus a frozen int8 weight, as a quantized base model (QLoRA-style) has."""

    def __init__(self) -> None:
        super().__init__()
        self.qweight = nn.Parameter(torch.randint(-128, 128, (6, 4), dtype=torch.int8), requires_grad=False)


def test_parameters_that_are_not_floating_point_are_left_out_with_a_warning(tmp_path):
    torch.manual_seed(0)
    monitor = UpdateSparsityMonitor(every_n_steps=2, save_masks=True, rank_every_n_checks=1)
    with pytest.warns(UserWarning, match=r"1 parameters are not floating point .*\['qweight \(torch.int8\)'\]"):
        fit(QuantizedFrozen(), monitor, tmp_path, max_steps=4)
    assert_history(monitor.history, expected_history([2, 4]))  # denominators without qweight's 24 elements
    assert not any("qweight" in key for _, metrics in monitor.history for key in metrics)
    masks = MaskFile.open(tmp_path / "update_sparsity" / "masks-native-step4.npz")
    assert "qweight" not in [p["name"] for p in masks.parameters]


class WithEmptyHalfPrecision(SlidingColumns):
    """SlidingColumns plus a float16 parameter with no elements: a dtype of which this process holds nothing, as a
    rank with an empty FSDP2 shard does."""

    def __init__(self) -> None:
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(0, 4, dtype=torch.float16))


def test_a_dtype_with_no_local_elements_counts_nothing(tmp_path):
    torch.manual_seed(0)
    monitor = UpdateSparsityMonitor(every_n_steps=2)
    fit(WithEmptyHalfPrecision(), monitor, tmp_path, max_steps=4)
    assert_history(monitor.history, expected_history([2, 4]))  # the same numbers as without the empty parameter
    assert [m["update_sparsity/empty"] for _, m in monitor.history] == [1.0, 1.0]  # nothing in it changed


def test_an_atol_that_rounds_to_0_for_the_model_dtype_is_refused_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"atol=1e-46 rounds to 0 where the differences of torch.float32 values"):
        fit(fresh_model(), UpdateSparsityMonitor(atol=1e-46), tmp_path, max_steps=1)
    fit(fresh_model().double(), UpdateSparsityMonitor(atol=1e-46), tmp_path, max_steps=1)  # float64 resolves it


class WithLayerNamedTotal(Constant):
    """Constant plus an untrained module named ``total``: its layer would be logged as ``update_sparsity/total``."""

    def __init__(self) -> None:
        super().__init__(lr=1e-3)
        self.total = nn.Linear(2, 3)


def test_a_layer_named_like_a_whole_model_metric_is_refused_unless_per_layer_is_off(tmp_path):
    with pytest.raises(ValueError, match=r"layer names \['total'\] clash with the metrics .*use per_layer=False"):
        fit(WithLayerNamedTotal(), UpdateSparsityMonitor(every_n_steps=1), tmp_path, max_steps=1)
    monitor = UpdateSparsityMonitor(every_n_steps=1, per_layer=False)
    fit(WithLayerNamedTotal(), monitor, tmp_path, max_steps=1)
    assert monitor.history[0][1]["update_sparsity/total"] == pytest.approx(9 / 41)  # only `total` is unchanged


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers: each batch makes two ``opt.step()``, so ``global_step`` moves by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(4, 3), nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(batch_idx)
        inputs, targets = torch.randn(4, 4, generator=generator), torch.randn(4, 2, generator=generator)
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(F.mse_loss(self.second(self.first(inputs)), targets))
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)


def test_checks_when_global_step_jumps_over_a_multiple(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=3)
    trainer = fit(TwoOptimizers(), monitor, tmp_path, max_steps=12)
    assert trainer.global_step == 12
    # global_step goes 2, 4, 6, ...: a check at the first step at or after each multiple of 3.
    assert [step for step, _ in monitor.history] == [4, 6, 10, 12]


def test_stop_and_resume_reports_the_same_sequence(tmp_path):
    uninterrupted = UpdateSparsityMonitor(every_n_steps=2)
    fit(fresh_model(), uninterrupted, tmp_path / "a", max_steps=6)
    assert_history(uninterrupted.history, expected_history([2, 4, 6]))

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path / "b", max_steps=4, callbacks=[checkpoints])
    folder = tmp_path / "b" / "update_sparsity"
    assert len(list(folder.glob("reference-*-rank0-of-1.pt"))) == 1
    assert len(list(folder.glob("since_last-*-step2-rank0-of-1.pt"))) == 1  # for the checkpoint at step 3
    for step in (3, 4):  # between checks (since-last snapshot from its file) and at a check (from the weights)
        resumed = UpdateSparsityMonitor(every_n_steps=2)
        fit(
            fresh_model(),
            resumed,
            tmp_path / f"resume{step}",
            max_steps=6,
            ckpt_path=next((tmp_path / "ckpt").glob(f"*step={step}.ckpt")),
        )
        assert resumed.history == uninterrupted.history
        heatmap = "update_sparsity/heatmap-native.png"  # all three checks, as the uninterrupted run drew them
        assert (tmp_path / f"resume{step}" / heatmap).read_bytes() == (tmp_path / "a" / heatmap).read_bytes()


def test_branches_of_one_checkpoint_each_resume_from_their_own_since_last_snapshot(tmp_path):
    """Two runs branched from one checkpoint (e.g. two WSD decays) share its run id and snapshot folder, and both save
    a checkpoint between the same two checks. Each must resume from the since-last snapshot of its own weights."""

    def branch(data_seed: int) -> SlidingColumns:
        model = fresh_model()
        model.data_seed = data_seed  # other values, same active columns: the ground truth holds for each branch
        return model

    def checkpoints(name):
        return ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)

    fit(branch(1000), UpdateSparsityMonitor(every_n_steps=2), tmp_path / "parent", 1, callbacks=[checkpoints("p")])
    start = next((tmp_path / "p").glob("*step=1.ckpt"))
    for name, seed in (("a", 2000), ("b", 3000)):  # both save at step 3, between the checks at 2 and 4
        fit(branch(seed), UpdateSparsityMonitor(every_n_steps=2), tmp_path / name, 3, start, [checkpoints(name)])
    for name in ("a", "b"):
        resumed = UpdateSparsityMonitor(every_n_steps=2)
        seed = {"a": 2000, "b": 3000}[name]
        fit(
            branch(seed),
            resumed,
            tmp_path / f"{name}-resumed",
            4,
            ckpt_path=next((tmp_path / name).glob("*step=3.ckpt")),
        )
        assert_history(resumed.history, expected_history([2, 4]))
    folder = tmp_path / "parent" / "update_sparsity"
    assert len(list(folder.glob("reference-*"))) == 1  # the reference of step 0 is the parent's, shared on purpose
    assert len(list(folder.glob("since_last-*-step2-*"))) == 2  # one per branch

    # A checkpoint of an older version names its since-last file without a fit token, and still resumes.
    checkpoint = torch.load(next((tmp_path / "b").glob("*step=3.ckpt")), weights_only=False)
    state = checkpoint["callbacks"]["UpdateSparsityMonitor"]
    token = state.pop("since_last_fit")
    file = folder / f"since_last-{state['run_id']}-fit{token}-step2-rank0-of-1.pt"
    file.rename(folder / f"since_last-{state['run_id']}-step2-rank0-of-1.pt")
    torch.save(checkpoint, tmp_path / "older.ckpt")
    resumed = UpdateSparsityMonitor(every_n_steps=2)
    fit(branch(3000), resumed, tmp_path / "older", 4, ckpt_path=tmp_path / "older.ckpt")
    assert_history(resumed.history, expected_history([2, 4]))


def test_resume_refuses_changed_settings_missing_snapshots_and_other_world_sizes_of_sharded_runs(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path / "run", max_steps=3, callbacks=[checkpoints])
    checkpoint = next((tmp_path / "ckpt").glob("*.ckpt"))
    with pytest.raises(ValueError, match="settings changed on resume"):
        fit(
            fresh_model(),
            UpdateSparsityMonitor(every_n_steps=2, compare_as="bfloat16"),
            tmp_path,
            4,
            ckpt_path=checkpoint,
        )
    state = torch.load(checkpoint, weights_only=False)
    saved = state["callbacks"]["UpdateSparsityMonitor"]
    assert saved["sharded"] is False and saved["world_size"] == 1
    saved.update(world_size=2, sharded=True)  # as a 2-process FSDP run saves it
    torch.save(state, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match="cannot resume on 1 processes: .* per-rank shards of a 2-process run"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path, 4, ckpt_path=tmp_path / "two.ckpt")
    del saved["sharded"]  # as older versions saved it: assumed sharded
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="cannot resume on 1 processes"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path, 4, ckpt_path=tmp_path / "old.ckpt")
    saved.update(world_size=1, sharded=True)  # a 1-process sharded run resumed unsharded
    torch.save(state, tmp_path / "sharded.ckpt")
    with pytest.raises(ValueError, match=r"cannot resume a sharded \(FSDP or FSDP2\) run unsharded"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path, 4, ckpt_path=tmp_path / "sharded.ckpt")
    next((tmp_path / "run" / "update_sparsity").glob("since_last-*")).unlink()
    with pytest.raises(FileNotFoundError, match="since_last-.*is missing"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path, 4, ckpt_path=checkpoint)


@pytest.mark.cuda
@pytest.mark.parametrize("snapshot_device", ["same", "cpu"])
def test_cuda_fit_ground_truth(tmp_path, snapshot_device):
    """On a GPU: the fused kernel, the deferred read-back of the counts, and (``"cpu"``) streamed pinned snapshots."""
    monitor = UpdateSparsityMonitor(every_n_steps=2, snapshot_device=snapshot_device, save_masks=True)
    fit(fresh_model(), monitor, tmp_path, max_steps=6, accelerator="gpu")
    assert monitor._checker.streamed == (snapshot_device == "cpu")
    assert_history(monitor.history, expected_history([2, 4, 6]))
    masks = MaskFile.open(tmp_path / "update_sparsity" / "masks-native-step6.npz")
    assert masks.unpacked("first.weight")[:, :7].all() and not masks.unpacked("first.weight")[:, 7].any()


def test_reference_checkpoint(tmp_path):
    first = fresh_model()
    trainer = fit(first, UpdateSparsityMonitor(every_n_steps=2), tmp_path / "a", max_steps=2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    # Same init, same data: after 2 steps the second run equals the checkpoint, then moves from it.
    monitor = UpdateSparsityMonitor(every_n_steps=2, reference=str(tmp_path / "step2.ckpt"), save_masks=True)
    fit(fresh_model(), monitor, tmp_path / "b", max_steps=4)
    assert monitor.history[0][1]["update_sparsity/total"] == 1.0
    assert monitor.history[1][1]["update_sparsity/total"] == pytest.approx(
        expected_metrics(4, previous=2)["update_sparsity/since_last"], abs=1e-12
    )
    masks = MaskFile.open(tmp_path / "b" / "update_sparsity" / "masks-native-step4.npz")
    assert masks.metadata["reference"] == str(tmp_path / "step2.ckpt")
    assert (masks.metadata["reference_step"], masks.metadata["step"]) == (2, 4)
    moved = masks.unpacked("first.weight").any(axis=0)  # steps 2 and 3 moved columns 1 to 4
    assert moved.tolist() == [False, True, True, True, True, False, False, False]


def test_resume_refuses_a_reference_checkpoint_that_changed(tmp_path):
    trainer = fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2), tmp_path / "a", max_steps=2)
    reference = tmp_path / "reference.ckpt"
    trainer.save_checkpoint(reference)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    uninterrupted = UpdateSparsityMonitor(every_n_steps=2, reference=str(reference))
    fit(fresh_model(), uninterrupted, tmp_path / "b", max_steps=4, callbacks=[checkpoints])
    step3 = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    resumed = UpdateSparsityMonitor(every_n_steps=2, reference=str(reference))
    fit(fresh_model(), resumed, tmp_path / "c", max_steps=4, ckpt_path=step3)
    assert resumed.history == uninterrupted.history
    shutil.copyfile(step3, reference)  # the reference file was replaced by another checkpoint
    with pytest.raises(ValueError, match=r"reference checkpoint .*reference.ckpt' changed since the run started"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=2, reference=str(reference)), tmp_path / "d", 4, step3)


def test_reference_checkpoint_of_another_model_lists_the_differences(tmp_path):
    state = {k: v.clone() for k, v in fresh_model().state_dict().items()}
    state["first.weight"] = torch.zeros(3, 3)
    del state["second.bias"]
    torch.save({"state_dict": state}, tmp_path / "other.ckpt")
    monitor = UpdateSparsityMonitor(reference=str(tmp_path / "other.ckpt"))
    with pytest.raises(ValueError, match=r"(?s)missing parameter 'second.bias'.*'first.weight': checkpoint has shape"):
        fit(fresh_model(), monitor, tmp_path, max_steps=1)


class SameInput(pl.LightningModule):
    """Every row of every batch is the same vector, so the update of ``w`` is a sum of ``g x^T``: rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5, 6))
        self.x = torch.linspace(-1, 1, 6)

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)
        targets = torch.randn(5, generator=generator)
        return F.mse_loss(self.w @ self.x, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)


def test_update_rank_of_rank_one_updates(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=1, rank_every_n_checks=2)
    fit(SameInput(), monitor, tmp_path, max_steps=4)
    ranked = [(step, m) for step, m in monitor.history if "update_rank/w" in m]
    assert [step for step, _ in ranked] == [2, 4]
    for _, metrics in ranked:
        assert metrics["update_rank/w"] == 1 / 5
        assert metrics["update_stable_rank/w"] == pytest.approx(1.0, abs=1e-5)


def test_update_rank_is_nan_once_a_parameter_is_nan_and_the_fit_goes_on(tmp_path):
    monitor = UpdateSparsityMonitor(every_n_steps=1, rank_every_n_checks=1)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    with pytest.warns(UserWarning, match=r"contain NaN .*\['w'\]"):
        fit(SameInput(), monitor, tmp_path, max_steps=2, callbacks=[PoisonAt(2)], logger=loggers)
    (_, first), (_, second) = monitor.history
    assert first["update_rank/w"] == 1 / 5
    assert math.isnan(second["update_rank/w"]) and math.isnan(second["update_stable_rank/w"])
    assert second["update_sparsity/total"] == 0.0  # SGD moved every element; the NaN one counts as changed too
    logged = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert logged["update_rank/w"][0] == (1, 1 / 5) and math.isnan(logged["update_rank/w"][1][1])


def test_update_rank_formula():
    assert update_rank(torch.zeros(3, 4)) == (0.0, 0.0)
    for bad in (float("nan"), float("inf")):
        assert all(math.isnan(value) for value in update_rank(torch.tensor([[1.0, bad], [0.0, 2.0]])))
    fraction, stable = update_rank(torch.diag(torch.tensor([4.0, 3.0, 0.0])))
    assert fraction == 2 / 3 and stable == pytest.approx((16 + 9) / 16)
    with pytest.raises(ValueError, match="must be a matrix"):
        update_rank(torch.ones(3))


def test_heatmap_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=1, compare_as="bfloat16"), tmp_path, 3, logger=logger)
    png = tmp_path / "tb" / "version_0" / "update_sparsity" / "heatmap-bfloat16.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    assert "update_sparsity/heatmap" in events.Tags()["images"]
    assert "update_sparsity/total" in events.Tags()["scalars"]


class WithHyperparameters(SlidingColumns):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_settings_are_in_hparams_yaml_and_tensorboard_keeps_one_hparams_session(tmp_path):
    """TensorBoardLogger writes hparams.yaml once, at Lightning's first save after it logs the module's hyperparameters;
    the settings must be in it by then, and must not open a second hparams session in the event file."""
    import yaml
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    torch.manual_seed(0)
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    fit(WithHyperparameters(), UpdateSparsityMonitor(every_n_steps=1, atol=1e-3), tmp_path, 2, logger=loggers)
    expected = {
        "lr": 0.01,
        "update_sparsity/compare_as": "None",
        "update_sparsity/atol": 0.001,
        "update_sparsity/reference": "fit_start",
    }
    for name in ("tb", "csv"):
        assert yaml.safe_load((tmp_path / name / "version_0" / "hparams.yaml").read_text()) == expected
    sessions = []
    for file in (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(file)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    content = value.metadata.plugin_data.content
                    sessions.append(
                        sorted(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
                    )
    assert sessions == [["lr"]]  # Lightning's session with the module's hyperparameters, and no other


def test_unwritable_log_folder_is_a_clear_error_before_training(tmp_path):
    (tmp_path / "update_sparsity").write_text("a file where the folder should be")
    with pytest.raises(OSError, match="UpdateSparsityMonitor needs a writable folder .*update_sparsity"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=1, save_masks=True), tmp_path, max_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update_sparsity"]


def test_disk_full_while_writing_masks_is_a_clear_error_without_partial_files(tmp_path, monkeypatch):
    import lightning_power.files

    real_replace = os.replace

    def disk_full_for_masks(source, target):
        if "masks-" in str(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(lightning_power.files.os, "replace", disk_full_for_masks)
    with pytest.raises(OSError, match="could not save the masks.*masks-native-step2.npz.*No space left on device"):
        fit(fresh_model(), UpdateSparsityMonitor(every_n_steps=1, save_masks=True), tmp_path, max_steps=2)
    assert not [p.name for p in (tmp_path / "update_sparsity").iterdir() if "masks" in p.name]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1, got 0"),
        ({"every_n_steps": -3}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"atol": -1e-5}, r"atol must be a finite number >= 0 \(0 = bit-exact\), got -1e-05"),
        ({"atol": float("nan")}, "atol"),
        ({"compare_as": "float16"}, r"compare_as must be one of \(None, 'bfloat16'\), got 'float16'"),
        ({"compare_as": "bf16"}, "compare_as"),
        ({"rank_every_n_checks": -1}, "rank_every_n_checks must be an integer >= 0"),
        ({"snapshot_device": "gpu"}, "snapshot_device must be one of"),
        ({"reference": "no/such/file.ckpt"}, "reference must be 'fit_start' or an existing checkpoint file"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateSparsityMonitor(**kwargs)


def test_no_warning_on_a_clean_run(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*UpdateSparsityMonitor.*")
        monitor = UpdateSparsityMonitor(every_n_steps=3)
        fit(fresh_model(), monitor, tmp_path, max_steps=3)
    assert math.isclose(monitor.history[0][1]["update_sparsity/total"], expected_metrics(3, 0)["update_sparsity/total"])
