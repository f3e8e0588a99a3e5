import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_power.cli import LightningPowerCLI, main
from tests.helpers.jobs import CONFIGS, read_metrics
from tests.helpers.tiny import tiny_cli_args

DEMO = str(CONFIGS / "gpt_demo.yaml")


class RecordLR(pl.Callback):
    """Records the LR each optimizer step actually uses and the parameters the optimizer holds."""

    lrs: list[float] = []
    optimizer_params_are_module_params: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        type(self).lrs = []
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        type(self).optimizer_params_are_module_params = [held == {id(p) for p in pl_module.parameters()}]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        type(self).lrs.append(optimizer.param_groups[0]["lr"])


def test_print_config_parses_the_demo_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_power.demo.GPT" in printed
    assert "class_path: lightning_power.demo.ByteCorpus" in printed
    assert "class_path: torch.optim.AdamW" in printed


def test_short_fit_logs_validation_bpb_and_writes_a_checkpoint(tmp_path):
    main(
        [
            "fit",
            "--config",
            DEMO,
            *tiny_cli_args(max_steps=6),
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
        ]
    )
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    val_loss, val_bpb = metrics["val/loss"][-1][1], metrics["val/bpb"][-1][1]
    assert val_bpb == pytest.approx(val_loss / math.log(2), rel=1e-5)
    assert 0 < val_bpb < 8.5  # a uniform guess over 256 bytes is exactly 8 bits
    assert len(metrics["lr-AdamW"]) == 6  # the LearningRateMonitor the CLI adds, once per step
    assert list((tmp_path / "csv" / "version_0" / "checkpoints").glob("*.ckpt"))

    # validate evaluates the checkpoint's own model, even when the config names another width (fit refuses that)
    last = str(tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt")
    main(["validate", "--config", DEMO, *tiny_cli_args(), "--model.init_args.width=64", f"--ckpt_path={last}"])
    validated = read_metrics(tmp_path / "csv" / "version_1" / "metrics.csv")
    assert validated["val/loss"][-1][1] == pytest.approx(val_loss, rel=1e-5)
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, *tiny_cli_args(), "--model.init_args.width=64", f"--ckpt_path={last}"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_yaml_scheduler_steps_once_per_optimizer_step(accumulate):
    # LinearLR from 0.25x to 1x over 4 steps: the LR of optimizer step k is lr * (0.25 + 0.75 * min(k, 4) / 4).
    main(
        [
            "fit",
            "--config",
            DEMO,
            *tiny_cli_args(max_steps=6),
            "--trainer.logger=false",
            f"--trainer.accumulate_grad_batches={accumulate}",
            "--optimizer.lr=0.01",
            "--lr_scheduler=torch.optim.lr_scheduler.LinearLR",
            "--lr_scheduler.start_factor=0.25",
            "--lr_scheduler.total_iters=4",
            "--trainer.callbacks+=tests.test_cli.RecordLR",
        ]
    )
    expected = [0.01 * (0.25 + 0.75 * min(k, 4) / 4) for k in range(6)]
    assert RecordLR.lrs == pytest.approx(expected, rel=1e-12)


# A ReduceLROnPlateau that halves the LR (0.01) after every validation but the first: no validation improves val/loss
# by 10 nats.
HALVE_ON_EVERY_PLATEAU = (
    "--optimizer.lr=0.01",
    "--lr_scheduler=lightning.pytorch.cli.ReduceLROnPlateau",
    "--lr_scheduler.monitor=val/loss",
    "--lr_scheduler.factor=0.5",
    "--lr_scheduler.patience=0",
    "--lr_scheduler.threshold=10",
    "--lr_scheduler.threshold_mode=abs",
)


def test_yaml_reduce_lr_on_plateau_steps_on_the_validation_metric(tmp_path):
    # 3 epochs of 3 steps, validated after each; a plateau is any epoch that does not improve val/loss by 10 nats,
    # so the LR halves after the second epoch.
    main(
        [
            "fit",
            "--config",
            DEMO,
            *tiny_cli_args(max_steps=9),
            "--trainer.limit_train_batches=3",
            *HALVE_ON_EVERY_PLATEAU,
        ]
    )
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert len(metrics["val/loss"]) == 3
    assert [lr for _, lr in metrics["lr-AdamW"]] == pytest.approx([0.01] * 6 + [0.005] * 3, rel=1e-12)


def test_yaml_reduce_lr_on_plateau_steps_at_epoch_end_only_as_in_lightning_cli():
    # Validation every 2 batches inside one long epoch: the plateaus it sees do not step the scheduler, which steps
    # at the end of each training epoch (the epoch-end case is the test above), as LightningCLI's does.
    main(
        [
            "fit",
            "--config",
            DEMO,
            *tiny_cli_args(max_steps=8),
            "--trainer.logger=false",
            "--trainer.val_check_interval=2",
            *HALVE_ON_EVERY_PLATEAU,
            "--trainer.callbacks+=tests.test_cli.RecordLR",
        ]
    )
    assert RecordLR.lrs == pytest.approx([0.01] * 8, rel=1e-12)


def test_an_lr_scheduler_without_an_optimizer_is_refused_not_dropped():
    args = ["fit", "--config", DEMO, *tiny_cli_args(max_steps=1), "--trainer.logger=false", "--optimizer=null"]
    with pytest.raises(ValueError, match=r"lr_scheduler: is set but optimizer: is not"):
        main([*args, "--lr_scheduler=torch.optim.lr_scheduler.LinearLR"])
    main(args)  # without either: the model's own configure_optimizers, as in LightningCLI


def test_torchs_reduce_lr_on_plateau_is_refused_with_the_class_that_takes_a_monitor():
    args = ["fit", "--config", DEMO, *tiny_cli_args(max_steps=1), "--trainer.logger=false"]
    with pytest.raises(ValueError, match=r"use lightning\.pytorch\.cli\.ReduceLROnPlateau with init_args\.monitor"):
        main([*args, "--lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau"])


def test_yaml_optimizer_is_built_over_the_parameters_the_trainer_trains():
    main(
        [
            "fit",
            "--config",
            DEMO,
            *tiny_cli_args(max_steps=1),
            "--trainer.logger=false",
            "--trainer.callbacks+=tests.test_cli.RecordLR",
        ]
    )
    assert RecordLR.optimizer_params_are_module_params == [True]


def test_help_lists_the_tools(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for tool in ("coord-check", "sparsity-overlap", "recommend"):
        assert tool in out


BORING_FIT = [
    "fit",
    "--trainer.max_steps=3",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
]


class LRBoringModel(BoringModel):
    """BoringModel that records the LR each optimizer step uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_single_class_registrations_get_their_class_path_and_the_scheduler_steps_per_step():
    class SGDCLI(LightningPowerCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_optimizer_args(torch.optim.SGD)
            parser.add_lr_scheduler_args(torch.optim.lr_scheduler.ExponentialLR)

    args = [*BORING_FIT, "--optimizer.lr=0.5", "--lr_scheduler.gamma=0.5"]
    cli = SGDCLI(LRBoringModel, BoringDataModule, args=args, save_config_callback=None)
    assert isinstance(cli.trainer.optimizers[0], torch.optim.SGD)
    assert cli.model.lrs == pytest.approx([0.5, 0.25, 0.125], rel=1e-12)


class LinkedOptimizerModel(LRBoringModel):
    """Builds its own optimizer from a linked config, with its own schedule: 0.1 x the optimizer's LR."""

    def __init__(self, optimizer_init: dict | None = None) -> None:
        super().__init__()
        self.optimizer_init = optimizer_init

    def configure_optimizers(self):
        optimizer = instantiate_class(self.parameters(), self.optimizer_init)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_an_optimizer_linked_to_the_model_keeps_the_models_configure_optimizers():
    class LinkedCLI(LightningPowerCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_optimizer_args((torch.optim.SGD, torch.optim.Adam), link_to="model.optimizer_init")

    args = [*BORING_FIT, "--optimizer=SGD", "--optimizer.lr=0.5"]
    cli = LinkedCLI(LinkedOptimizerModel, BoringDataModule, args=args, save_config_callback=None)
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert cli.model.lrs == pytest.approx([0.05] * 3, rel=1e-12)


def test_a_subclass_configure_optimizers_hook_gets_the_optimizer_built_over_the_trained_parameters():
    received = []

    class EpochCLI(LightningPowerCLI):
        @staticmethod
        def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):
            received.append((lightning_module, optimizer, lr_scheduler))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "epoch"}}

    args = [*BORING_FIT, "--optimizer=SGD", "--optimizer.lr=0.5", "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"]
    cli = EpochCLI(LRBoringModel, BoringDataModule, args=args, save_config_callback=None)
    [(module, optimizer, scheduler)] = received
    assert module is cli.model and optimizer is cli.trainer.optimizers[0]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in cli.model.parameters()}
    assert scheduler is cli.trainer.lr_scheduler_configs[0].scheduler
    assert cli.trainer.lr_scheduler_configs[0].interval == "epoch"
    assert cli.model.lrs == [0.5] * 3  # StepLR(gamma=0.1) per epoch: no step within the first epoch


class OwnOptimizerModel(BoringModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_yaml_optimizer_replacing_the_models_own_configure_optimizers_warns():
    args = [*BORING_FIT, "--optimizer=Adam", "--optimizer.lr=0.01"]
    match = r"`OwnOptimizerModel.configure_optimizers` will be overridden by `LightningPowerCLI.configure_optimizers`"
    with pytest.warns(UserWarning, match=match):
        cli = LightningPowerCLI(OwnOptimizerModel, BoringDataModule, args=args, save_config_callback=None)
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)


def test_more_than_one_automatic_optimizer_is_refused_as_in_lightning_cli():
    class TwoOptimizersCLI(LightningPowerCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_optimizer_args(torch.optim.SGD)
            parser.add_optimizer_args(torch.optim.Adam, nested_key="second_optimizer")

    args = [*BORING_FIT, "--optimizer.lr=0.1"]
    found = r"\['optimizer', 'second_optimizer', 'lr_scheduler'\]"
    with pytest.raises(MisconfigurationException, match=rf"expects at most one optimizer .* but found {found}"):
        TwoOptimizersCLI(BoringModel, BoringDataModule, args=args, save_config_callback=None)
