"""The MuP callback in real Trainer runs: groups, init, readout, audit, survival (compile, resume, deepcopy), YAML."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mup
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, LearningRateMonitor, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_power.cli import LightningPowerCLI
from lightning_power.demo import GPT
from lightning_power.mup import MuP, MuPPlan, attach_readout_multiplier
from lightning_power.mup.readout import readout_multiplier_of
from tests.helpers.versions import compiled_module_logging, cpu_fsdp2

REPO = Path(__file__).resolve().parents[1]
ARGS = {"depth": 1, "n_heads": 2, "context_length": 8, "attention_scale": "1/d_head"}
WIDTH, BASE, DELTA = 32, 8, 16  # width multiplier 4
STEPS = 5


def make_gpt(seed: int = 0, width: int = WIDTH) -> GPT:
    torch.manual_seed(seed)
    return GPT(width=width, **ARGS)


def one_batch() -> DataLoader:
    """The same batch at every step, so a resumed run sees the same data whatever its dataloader position."""
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(123))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(model: pl.LightningModule, callback: MuP, max_steps: int = STEPS, ckpt_path: str | None = None, **kw) -> list:
    recorder = RecordLosses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=kw.pop("logger", False),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback, recorder],
        **kw,
    )
    trainer.fit(model, one_batch(), ckpt_path=ckpt_path)
    return recorder.losses, trainer


def quiet_trainer(*callbacks: pl.Callback, **overrides: Any) -> pl.Trainer:
    """A CPU trainer without logger, checkpoints or progress output; one step unless ``overrides`` say otherwise."""
    settings: dict[str, Any] = {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False}
    settings |= {"enable_checkpointing": False, "enable_model_summary": False, **overrides}
    return pl.Trainer(callbacks=list(callbacks), **settings)


def mup_callback(**kw) -> MuP:
    return MuP(**{"base_overrides": {"width": BASE}, "delta_overrides": {"width": DELTA}, "readout": "head", **kw})


def reference_losses() -> list[float]:
    """The same run done by the mup package: MuReadout, set_base_shapes(rescale_params=True), MuAdamW."""
    model = make_gpt()
    model.head = mup.MuReadout(WIDTH, 256, bias=False)
    model.head.weight.data.copy_(make_gpt().head.weight.data)
    with torch.device("meta"):
        base, delta = GPT(width=BASE, **ARGS), GPT(width=DELTA, **ARGS)
        base.head, delta.head = mup.MuReadout(BASE, 256, bias=False), mup.MuReadout(DELTA, 256, bias=False)
    mup.set_base_shapes(model, base, delta=delta)
    optimizer = mup.MuAdamW(model.parameters(), lr=model.hparams.learning_rate)
    inputs, targets = next(iter(one_batch()))
    losses = []
    for _ in range(STEPS):
        loss = model.loss((inputs, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return reference_losses()


def test_groups_init_readout_and_audit(tmp_path: Path) -> None:
    model = make_gpt()
    callback = mup_callback()
    _, trainer = fit(model, callback, max_steps=1, logger=CSVLogger(tmp_path, name="run"))
    lr = model.hparams.learning_rate
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    }
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            assert group["lr"] == (lr / 4 if names[id(p)] in hidden else lr), names[id(p)]
    assert readout_multiplier_of(model.head).width_mult == 4.0
    assert "configure_optimizers" not in model.__dict__  # the regrouping wrapper is removed after fit
    # init: hidden matrices / sqrt(4), the rest as the module drew it (std 0.02); biases and norms stay exact
    with open(Path(trainer.log_dir) / "mup_params.csv") as file:
        table = {row["name"]: row for row in csv.DictReader(file)}
    assert set(table) == {n for n, _ in model.named_parameters()}
    for name, row in table.items():
        expected = 0.01 if name in hidden else 0.02
        if name.endswith("proj.weight"):
            expected /= math.sqrt(2)  # GPT-2 output projections: std / sqrt(2 * depth)
        if row["class"] != "vector_like" or "embedding" in name:
            assert math.isclose(float(row["init_std"]), expected, rel_tol=0.1), name
        assert row["lr_factor"] == ("0.25" if name in hidden else "1.0"), name
    assert table["head.weight"]["class"] == "readout" and table["head.weight"]["forward_multiplier"] == "0.25"
    assert (
        table["blocks.0.mlp.fc.weight"]["base_shape"] == "32x8"
        and table["token_embedding.weight"]["base_shape"] == "-x8"
    )
    with open(Path(trainer.log_dir) / "metrics.csv") as file:
        metrics = next(csv.DictReader(file))
    assert {k: float(v) for k, v in metrics.items() if k.startswith("mup/")} == {
        "mup/num_vector_like": 12.0,
        "mup/num_hidden": 4.0,
        "mup/num_readout": 1.0,
        "mup/width_mult": 4.0,
    }


@compiled_module_logging
def test_compiled_model_matches_the_mup_package(reference: list[float]) -> None:
    compiled, _ = fit(torch.compile(make_gpt(), backend="aot_eager"), mup_callback(model_init="torch_default"))
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=0)


def test_eager_resume_and_deepcopy_match_the_mup_package(reference: list[float], tmp_path: Path) -> None:
    callback_args = {"model_init": "torch_default"}  # the init rescale set_base_shapes(rescale_params=True) does
    model = make_gpt()
    eager, _ = fit(model, mup_callback(**callback_args))
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=0)

    first = make_gpt()
    _, trainer = fit(first, mup_callback(**callback_args), max_steps=2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed_model = make_gpt(seed=99)  # other weights: they must come from the checkpoint, and not be re-scaled
    callback = mup_callback(**callback_args)
    resumed, _ = fit(resumed_model, callback, ckpt_path=str(tmp_path / "step2.ckpt"))
    torch.testing.assert_close(resumed, reference[2:], rtol=1e-5, atol=0)
    assert callback._restored_plan == callback.plan

    # inference outside the Trainer (docs/mup.md): the plan from the checkpoint puts the readout multiplier back
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    loaded = make_gpt(seed=7)
    loaded.load_state_dict(checkpoint["state_dict"])
    MuPPlan.from_dict(checkpoint["callbacks"]["MuP"]["plan"]).attach_readouts(loaded)
    probe = torch.randint(0, 256, (2, 8))
    assert torch.equal(loaded(probe), first(probe))

    tokens = torch.randint(0, 256, (2, 8))
    twin = copy.deepcopy(model)  # as SWA / EMA callbacks do
    assert torch.equal(twin(tokens), model(tokens))
    twin.head._forward_pre_hooks.clear()
    assert not torch.allclose(twin(tokens), model(tokens))  # the copied hook is what keeps the 1/width logits


def test_mup_changes_training(reference: list[float]) -> None:
    """Guard for the test above: the reference is not what the plain module does."""
    plain = RecordLosses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[plain],
    )
    trainer.fit(make_gpt(), one_batch())
    assert not math.isclose(plain.losses[-1], reference[-1], rel_tol=1e-3)


class OwnGroupsGPT(GPT):
    """Builds its muP param groups itself, with ``MuPPlan.param_groups`` for the family ``groups_for``, and uses SGD."""

    groups_for = "sgd"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        plan = next(cb for cb in self.trainer.callbacks if isinstance(cb, MuP)).plan
        return torch.optim.SGD(plan.param_groups(self, lr=0.1, optimizer=self.groups_for))


def test_own_param_groups_must_match_the_optimizer_and_are_audited_as_built(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OwnGroupsGPT(width=WIDTH, **ARGS)
    _, trainer = fit(model, mup_callback(), max_steps=1, logger=CSVLogger(tmp_path, name="run"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = trainer.optimizers[0].param_groups
    applied = {names[id(p)]: (g["mup_lr_factor"], g["mup_wd_factor"]) for g in groups for p in g["params"]}
    assert applied["token_embedding.weight"] == (4.0, 0.25)  # SGD: one width dimension gets lr * m, wd / m
    with open(Path(trainer.log_dir) / "mup_params.csv") as file:
        table = {row["name"]: row for row in csv.DictReader(file)}
    assert {name: (float(row["lr_factor"]), float(row["wd_factor"])) for name, row in table.items()} == applied
    assert {row["optimizer_family"] for row in table.values()} == {"sgd"}
    model = OwnGroupsGPT(width=WIDTH, **ARGS)
    model.groups_for = "adam"
    with pytest.raises(ValueError, match=r"optimizer='adam'\) were given to SGD.*build them with optimizer='sgd'"):
        fit(model, mup_callback(), max_steps=1)


class SGDUnknownToMuP(torch.optim.Optimizer):  # a third-party optimizer: muP cannot tell its family
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.add_(param.grad, alpha=-group["lr"])
        return loss


class OwnGroupsUnknownOptimizerGPT(GPT):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        plan = next(cb for cb in self.trainer.callbacks if isinstance(cb, MuP)).plan
        return SGDUnknownToMuP(plan.param_groups(self, lr=0.1, optimizer="sgd"))


def test_own_param_groups_are_trusted_for_an_optimizer_class_mup_does_not_know() -> None:
    torch.manual_seed(0)
    _, trainer = fit(OwnGroupsUnknownOptimizerGPT(width=WIDTH, **ARGS), mup_callback(), max_steps=1)
    assert {g["mup_family"] for g in trainer.optimizers[0].param_groups} == {"sgd"}
    with pytest.raises(TypeError, match="optimizer_family"):  # its own groups would need the family named
        torch.manual_seed(0)
        model = GPT(width=WIDTH, **ARGS)
        model.configure_optimizers = lambda: SGDUnknownToMuP(model.parameters())
        fit(model, mup_callback(), max_steps=1)


def test_optimizer_family_gives_the_rules_for_an_optimizer_mup_does_not_know() -> None:
    torch.manual_seed(0)
    model = GPT(width=WIDTH, **ARGS)
    model.configure_optimizers = lambda: SGDUnknownToMuP(model.parameters())
    _, trainer = fit(model, mup_callback(optimizer_family="sgd"), max_steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert lrs["token_embedding.weight"] == pytest.approx(0.4)  # SGD: one width dimension gets lr * m
    assert lrs["blocks.0.attn.proj.weight"] == pytest.approx(0.1)  # hidden: lr * m_out / m_in
    assert lrs["final_norm.bias"] == pytest.approx(0.4)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_validate_test_and_predict_apply_the_readout_multiplier(stage: str) -> None:
    model = make_gpt()
    plain = copy.deepcopy(model)
    expected = copy.deepcopy(model)
    attach_readout_multiplier(expected.head, WIDTH / BASE)
    trainer = quiet_trainer(mup_callback())
    batch = next(iter(one_batch()))
    if stage == "predict":
        (logits,) = trainer.predict(model, DataLoader(batch[0], batch_size=4))
        torch.testing.assert_close(logits, expected(batch[0]))
        assert not torch.allclose(logits, plain(batch[0]))
    else:
        (metrics,) = getattr(trainer, stage)(model, one_batch(), verbose=False)
        loss = metrics[f"{'val' if stage == 'validate' else 'test'}/loss"]
        assert loss == pytest.approx(expected.loss(batch).item(), rel=1e-6)
        assert loss != pytest.approx(plain.loss(batch).item(), rel=1e-4)


def test_parameters_on_the_meta_device_in_setup_are_refused() -> None:
    with torch.device("meta"):
        model = GPT(width=WIDTH, **ARGS)
    with pytest.raises(Exception) as raised:  # Lightning's teardown then fails to move the meta module to the CPU
        fit(model, mup_callback(), max_steps=1)
    error = raised.value if isinstance(raised.value, ValueError) else raised.value.__context__
    assert isinstance(error, ValueError) and "on the meta device in setup (deferred init)" in str(error)
    assert "pass model_init=None" in str(error)


def test_two_mup_callbacks_are_refused() -> None:
    model = make_gpt()  # Lightning refuses two in Trainer(callbacks=...), not two from configure_callbacks
    model.configure_callbacks = lambda: [mup_callback(), mup_callback(base_overrides={"width": 16})]
    with pytest.raises(ValueError, match="more than one MuP callback is configured; keep one"):
        fit(model, mup_callback(), max_steps=1)


def test_resume_with_another_base_or_without_mup_state_fails(tmp_path: Path) -> None:
    _, trainer = fit(make_gpt(), mup_callback(), max_steps=1)
    trainer.save_checkpoint(tmp_path / "mup.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint's muP plan differs.*base \[.*, 8\].* vs .*base \[.*, 16\]"):
        fit(
            make_gpt(),
            mup_callback(base_overrides={"width": 16}, delta_overrides={"width": 8}),
            max_steps=2,
            ckpt_path=str(tmp_path / "mup.ckpt"),
        )
    plain = quiet_trainer()
    plain.fit(make_gpt(), one_batch())
    plain.save_checkpoint(tmp_path / "sp.ckpt")
    with pytest.raises(RuntimeError, match="holds no muP state"):
        fit(make_gpt(), mup_callback(), max_steps=2, ckpt_path=str(tmp_path / "sp.ckpt"))


def test_parameter_created_after_setup_is_an_error_at_optimizer_time() -> None:
    class Late(GPT):
        def configure_model(self) -> None:
            if not hasattr(self, "late"):
                self.late = nn.Linear(4, 4)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'late.weight'.* is not in the muP plan"):
        fit(Late(width=WIDTH, **ARGS), mup_callback(), max_steps=1)


def test_base_model_and_base_shapes_give_the_same_plan(tmp_path: Path) -> None:
    with torch.device("meta"):
        base, delta = GPT(width=BASE, **ARGS), GPT(width=DELTA, **ARGS)
    by_model = MuP(base_model=base, delta_model=delta, readout="head")
    fit(make_gpt(), by_model, max_steps=1)
    base.head, delta.head = (mup.MuReadout(w, 256, bias=False, device="meta") for w in (BASE, DELTA))
    mup.make_base_shapes(base, delta, savefile=str(tmp_path / "gpt.bsh"))
    by_file = MuP(base_shapes=tmp_path / "gpt.bsh")  # readout auto-detected: the only width -> 256 nn.Linear
    fit(make_gpt(), by_file, max_steps=1)
    by_overrides = mup_callback()
    fit(make_gpt(), by_overrides, max_steps=1)
    assert by_model.plan == by_file.plan == by_overrides.plan


@pytest.mark.parametrize("config", ["gpt_mup.yaml", "gpt_mup_power.yaml"])
def test_yaml_config_regroups_the_cli_optimizer_and_scheduler(config: str, tmp_path: Path) -> None:
    cli = LightningPowerCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "examples" / "configs" / config),
            "--model.init_args.width=64",
            "--model.init_args.depth=1",
            "--model.init_args.head_dim=16",
            "--model.init_args.context_length=16",
            "--data.init_args.context_length=16",
            "--data.init_args.batch_size=4",
            "--data.init_args.max_bytes=20000",
            "--data.init_args.max_val_bytes=2048",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--lr_scheduler.init_args.tokens_per_step=64" if "power" in config else "--trainer.log_every_n_steps=1",
        ]
    )
    optimizer = cli.trainer.optimizers[0]
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    names = {id(p): n for n, p in cli.model.named_parameters()}
    factors = {names[id(p)]: g["mup_lr_factor"] for g in optimizer.param_groups for p in g["params"]}
    assert factors["blocks.0.mlp.fc.weight"] == 0.5 and factors["head.weight"] == 1.0  # width 64 over base 32
    assert [base / g["mup_lr_factor"] for base, g in zip(scheduler.base_lrs, optimizer.param_groups)] == [0.02] * 2
    ratio = optimizer.param_groups[1]["lr"] / optimizer.param_groups[0]["lr"]
    assert math.isclose(ratio, optimizer.param_groups[1]["mup_lr_factor"], rel_tol=1e-12)  # the schedule keeps muP's
    assert (Path(cli.trainer.log_dir) / "mup_params.csv").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of base_overrides, base_model, base_shapes"),
        ({"base_overrides": {"width": 8}, "base_shapes": "x.bsh"}, "exactly one of"),
        ({"base_overrides": {}}, "base_overrides must be a non-empty mapping"),
        (
            {"base_overrides": {"width": 8}, "delta_overrides": {"width": 16}, "delta_model": nn.Linear(1, 1)},
            "delta_overrides or delta_model",
        ),
        ({"base_shapes": "missing.bsh"}, "is not a file"),
        ({"base_overrides": {"width": 8}, "readout": ""}, "readout must be"),
        ({"base_overrides": {"width": 8}, "model_init": "xavier"}, "model_init must be one of"),
        ({"base_overrides": {"width": 8}, "optimizer_family": "lion"}, "optimizer_family must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MuP(**kwargs)


def test_base_overrides_need_rebuildable_hparams() -> None:
    class NoHparams(pl.LightningModule):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.head = nn.Linear(width, 3)

        def training_step(self, batch, batch_idx):
            return self.head(torch.ones(1, self.head.in_features)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="call self.save_hyperparameters()"):
        fit(NoHparams(), mup_callback(), max_steps=1)
    with pytest.raises(ValueError, match=r"keys \['wdith'\] are not hyper-parameters of GPT"):
        fit(make_gpt(), mup_callback(base_overrides={"wdith": 8}), max_steps=1)


@pytest.mark.distributed
@cpu_fsdp2
def test_two_process_fsdp_and_fsdp2_give_the_same_mup_run(tmp_path: Path) -> None:
    """The shard-specific paths, FSDP1 flat-parameter views named ``blocks.0._fsdp_wrapped_module.*`` and FSDP2
    DTensors, regroup and train the same: same muP LR groups, same losses."""
    from tests.helpers.callbacks import read_records
    from tests.helpers.jobs import CONFIGS, run_cli

    runs = {}
    for strategy in ("fsdp", "fsdp2"):
        folder = tmp_path / strategy
        folder.mkdir()
        run_cli(
            [
                "fit",
                "--config",
                str(CONFIGS / "gpt_mup.yaml"),
                "--config",
                str(CONFIGS / f"strategy_{strategy}.yaml"),
                "--model.init_args.width=64",
                "--model.init_args.depth=1",
                "--model.init_args.head_dim=16",
                "--model.init_args.context_length=16",
                "--data.init_args.context_length=16",
                "--data.init_args.batch_size=4",
                "--data.init_args.max_bytes=100000",
                "--data.init_args.max_val_bytes=4096",
                "--trainer.max_steps=4",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.accelerator=cpu",
                "--trainer.devices=2",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.callbacks=tests.helpers.callbacks.RecordSteps",
                "--trainer.callbacks.path=steps.jsonl",
                "--trainer.callbacks+=lightning_power.mup.MuP",
                "--trainer.callbacks.base_overrides={width: 32}",
                "--trainer.callbacks.delta_overrides={width: 64}",
                "--trainer.callbacks.readout=head",
            ],
            folder,
        )
        runs[strategy] = read_records(folder / "steps.jsonl")
    assert sorted(runs["fsdp"]) == sorted(runs["fsdp2"]) == [1, 2, 3, 4]
    for step, record in runs["fsdp"].items():
        torch.testing.assert_close(runs["fsdp2"][step]["loss"], record["loss"], rtol=1e-5, atol=0)
        assert runs["fsdp2"][step]["lrs"] == record["lrs"]
        assert [lr / record["lrs"][0] for lr in record["lrs"]] == [1.0, 0.5]  # hidden matrices: 32 / 64


def test_lightning_lr_finder_is_refused_above_the_base_width_and_runs_at_it() -> None:
    """The LR finder sets every param group to one LR: muP's ratios would be gone from the search."""
    from lightning.pytorch.tuner import Tuner

    def lr_find(model: GPT, callback: MuP):
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        return Tuner(trainer).lr_find(model, train_dataloaders=one_batch(), num_training=4, early_stop_threshold=None)

    with pytest.raises(ValueError, match=r"LR finder .* one LR, .* width multiplier 4\."):
        lr_find(make_gpt(), mup_callback())
    assert lr_find(make_gpt(width=BASE), mup_callback()).results["lr"]  # every ratio is 1 at the base width


def test_swa_with_one_lr_is_refused_above_the_base_width_and_a_list_per_group_keeps_the_ratios() -> None:
    """SWA with a float ``swa_lrs`` sets every group to that LR; the per-group list docs/mup.md gives keeps muP's."""

    def swa_fit(model: GPT, swa_lrs: float | list[float]) -> pl.Trainer:
        swa = StochasticWeightAveraging(swa_lrs=swa_lrs, swa_epoch_start=1, annealing_epochs=1)
        trainer = quiet_trainer(mup_callback(), swa, max_steps=-1, max_epochs=3)
        trainer.fit(model, one_batch())
        return trainer

    with pytest.raises(ValueError, match=r"swa_lrs=0\.01\) sets every param group to that one LR"):
        swa_fit(make_gpt(), 0.01)
    model = make_gpt()
    with torch.device("meta"):
        base, delta = GPT(width=BASE, **ARGS), GPT(width=DELTA, **ARGS)
    plan = MuPPlan.from_models(model, base, delta, readout="head")
    trainer = swa_fit(model, [g["lr"] for g in plan.param_groups(model, lr=0.01)])
    groups = trainer.optimizers[0].param_groups
    assert sorted(g["mup_lr_factor"] for g in groups) == [0.25, 1.0]
    assert [g["lr"] for g in groups] == pytest.approx([0.01 * g["mup_lr_factor"] for g in groups], rel=1e-12)


class Backbone(pl.LightningModule):
    """An input layer, a hidden ``backbone`` frozen at first, and a head; ``all_params`` hands the optimizer the
    frozen backbone too (what the muP error asks for)."""

    def __init__(self, width: int = 64, all_params: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inp, self.backbone, self.head = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(torch.relu(self.inp(x)))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters() if self.hparams.all_params else (p for p in self.parameters() if p.requires_grad)
        return torch.optim.AdamW(params, lr=1e-2)


class Unfreeze(BaseFinetuning):
    """Freezes ``frozen`` (module names) and unfreezes them at epoch 1, adding a param group or not (``add``)."""

    def __init__(self, frozen: list[str], add: bool) -> None:
        super().__init__()
        self.frozen, self.add = frozen, add

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze([pl_module.get_submodule(name) for name in self.frozen])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            modules = [pl_module.get_submodule(name) for name in self.frozen]
            if self.add:
                self.unfreeze_and_add_param_group(modules, optimizer, lr=1e-2, initial_denom_lr=1.0)
            else:
                self.make_trainable(modules)


def test_a_param_group_added_during_training_must_not_hold_parameters_mup_scales() -> None:
    def finetune(frozen: list[str], add: bool, all_params: bool = False) -> tuple[Backbone, pl.Trainer]:
        model = Backbone(all_params=all_params)
        callback = MuP(base_overrides={"width": 16}, delta_overrides={"width": 32}, readout="head")
        trainer = quiet_trainer(callback, Unfreeze(frozen, add), max_steps=-1, max_epochs=2)
        data = DataLoader(TensorDataset(torch.randn(8, 4), torch.arange(8) % 3), batch_size=8)
        trainer.fit(model, data)
        return model, trainer

    with pytest.raises(ValueError, match=r"added to AdamW after configure_optimizers holds backbone\.weight, whose"):
        finetune(["backbone"], add=True)  # a hidden weight: lr / 4 under muP, the base LR in the added group
    _, trainer = finetune(["inp"], add=True)  # vector-like: factor 1, so the added group is right as it is
    assert [g["mup_lr_factor"] for g in trainer.optimizers[0].param_groups] == [0.25, 1.0, 1.0]
    model, trainer = finetune(["backbone"], add=False, all_params=True)  # the way the error message gives
    hidden = next(g for g in trainer.optimizers[0].param_groups if any(p is model.backbone.weight for p in g["params"]))
    assert hidden["lr"] == 1e-2 / 4 and model.backbone.weight.requires_grad


def test_lr_monitor_tags_name_the_mup_groups_and_a_checkpoint_without_names_resumes(tmp_path: Path) -> None:
    """Tags read ``lr-AdamW/hidden``; a checkpoint saved before the groups had names still loads."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[mup_callback(), LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(make_gpt(), one_batch())
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    with open(Path(trainer.log_dir) / "metrics.csv") as file:
        columns = next(csv.reader(file))
    assert {"lr-AdamW/hidden", "lr-AdamW/vector_like-readout"} <= set(columns)

    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        del group["name"]  # as saved before this change
    torch.save(checkpoint, tmp_path / "unnamed.ckpt")
    callback = mup_callback()
    losses, resumed = fit(make_gpt(seed=99), callback, max_steps=3, ckpt_path=str(tmp_path / "unnamed.ckpt"))
    assert len(losses) == 1 and callback._restored_plan == callback.plan
    assert sorted(g["mup_lr_factor"] for g in resumed.optimizers[0].param_groups) == [0.25, 1.0]
