"""The coordinate check: muP flat, SP and a broken muP not; statistics, outputs, CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from lightning_power.demo import GPT
from lightning_power.mup import MuPPlan
from lightning_power.mup.coord_check import (
    _failure,
    _key_values,
    _load_config,
    _output_tensors,
    _Recorder,
    _slope,
    _width_arg,
    coord_check,
    main,
    mean_abs,
)

REPO = Path(__file__).resolve().parents[1]
WIDTHS = [16, 32, 64, 128]
TINY = {"depth": 1, "head_dim": 8, "context_length": 8, "attention_scale": "1/d_head"}


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, 256, (3, 8, 9), generator=torch.Generator().manual_seed(0))
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def run(batches, steps: int, **kwargs):
    return coord_check(GPT, WIDTHS, batches, model_args=TINY, steps=steps, readout="head", **kwargs)


def test_mup_is_flat_while_sp_and_broken_mup_grow(batches) -> None:
    mup = run(batches, 3, mup=True)
    assert mup.passed, mup.table()
    assert mup.max_abs_slope() < mup.tolerance
    assert mup.slopes["head"][0] == pytest.approx(-0.5, abs=0.1)  # the readout's init shrinkage, allowed
    sp = run(batches, 2, mup=False)
    assert not sp.passed
    assert min(sp.slopes["blocks.0.mlp.fc"]) > 0.4  # hidden pre-activations grow like sqrt(width) or faster
    assert sp.slopes["head"][0] == pytest.approx(0.5, abs=0.1)
    no_init = run(batches, 1, mup=True, model_init=None)  # muP groups and readout, but the init left at SP
    assert not no_init.passed and no_init.slopes["blocks.0.mlp.fc"][0] == pytest.approx(0.5, abs=0.1)
    assert set(mup.l1) == set(sp.l1) and "<output>" in mup.readout_outputs and len(mup.l1["head"]) == 3


class MLP(nn.Module):
    def __init__(self, width: int, zero_readout: bool = False) -> None:
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)
        if zero_readout:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hid(torch.relu(self.inp(x)))))


BATCH = (torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3)


def cross_entropy(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def mlp_check(lr: float, zero_readout: bool = False):
    return coord_check(
        lambda width: MLP(width, zero_readout),
        WIDTHS,
        [BATCH],
        steps=3,
        lr=lr,
        optimizer="sgd",
        readout="out",
        model_init="torch_default",
        loss_fn=cross_entropy,
    )


def test_values_that_blow_up_fail_and_zero_init_passes_at_step_1() -> None:
    blown = mlp_check(lr=1e8)  # mean |output| reaches inf at step 3 at every width, so every slope is NaN
    assert not blown.passed and math.isinf(blown.l1["hid"][2][0])
    assert "hid t=3: mean |output| is not finite (inf, inf, inf, inf by width)" in blown.failures
    assert "hid " in blown.table() and "nan!" in blown.table()
    zero = mlp_check(lr=0.1, zero_readout=True)
    assert zero.passed, zero.table()
    assert zero.l1["out"][0] == [0.0] * 4 and math.isnan(zero.slopes["out"][0])
    called = [3] * 4
    assert (
        _failure("m", 1, [0.0, 1.0, 1.0, 1.0], called, math.nan, False, 0.4)
        == "m t=1: mean |output| is 0 (0, 1, 1, 1 by width)"
    )
    # 0 at every width does not depend on width, at any step: a zero-init layer below a zero-init readout stays 0
    assert _failure("m", 2, [0.0] * 4, called, math.nan, False, 0.4) is None
    assert _failure("m", 2, [1.0, 1.0, 0.0, 1.0], called, math.nan, False, 0.4) == (
        "m t=2: mean |output| is 0 (1, 1, 0, 1 by width)"
    )
    assert _failure("m", 1, [1.0, math.nan, 1.0, 1.0], called, 0.0, False, 0.4) is not None
    # a width where no seed called the module leaves the slope unchecked, but a blow-up elsewhere still fails
    assert _failure("m", 2, [1.0, 1.0, 1.0, math.nan], [3, 3, 3, 0], math.nan, False, 0.4) is None
    assert (
        _failure("m", 2, [math.inf, 1.0, 1.0, math.nan], [3, 3, 3, 0], math.nan, False, 0.4)
        == "m t=2: mean |output| is not finite (inf, 1, 1, not called by width)"
    )


def test_dropping_the_readout_multiplier_or_the_hidden_lr_scaling_fails(monkeypatch) -> None:
    def adam_check():
        return coord_check(
            MLP,
            WIDTHS,
            [BATCH],
            steps=2,
            lr=0.1,
            optimizer="adam",
            readout="out",
            model_init="torch_default",
            loss_fn=cross_entropy,
        )

    assert adam_check().passed
    with monkeypatch.context() as patch:
        patch.setattr(MuPPlan, "attach_readouts", lambda self, model: None)
        no_multiplier = adam_check()
    assert not no_multiplier.passed and no_multiplier.slopes["out"][0] > 0.4  # logits grow like sqrt(width)
    with monkeypatch.context() as patch:
        patch.setattr(MuPPlan, "regroup", lambda self, *args, **kwargs: None)  # every weight at the base LR
        no_lr_scaling = adam_check()
    assert not no_lr_scaling.passed and no_lr_scaling.slopes["hid"][1] > 0.5  # hidden updates grow with width


class ShrinkingHidden(MLP):
    """Hidden weights drawn with std 1/width instead of 1/sqrt(width): the hidden layer's output shrinks with width."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        nn.init.normal_(self.hid.weight, std=1.0 / width)
        nn.init.zeros_(self.hid.bias)


def test_hidden_activations_that_shrink_with_width_fail() -> None:
    result = coord_check(
        ShrinkingHidden,
        WIDTHS,
        [BATCH],
        steps=1,
        optimizer="sgd",
        readout="out",
        model_init="torch_default",
        loss_fn=cross_entropy,
    )
    assert result.slopes["hid"][0] == pytest.approx(-0.5, abs=0.1)
    assert not result.passed and any(failure.startswith("hid t=1: slope") for failure in result.failures)
    assert result.slopes["inp"][0] == pytest.approx(0.0, abs=0.1) and not any(
        failure.startswith("inp ") for failure in result.failures
    )


class PostProcessed(MLP):
    """The model's output is the readout's output post-processed: a tanh soft-cap (Gemma) or a cast. Its weights have a
    width-independent std, so the readout's output shrinks like ``width^-1/2`` under muP."""

    def __init__(self, width: int, post: str) -> None:
        super().__init__(width)
        for layer in (self.inp, self.hid, self.out):
            nn.init.normal_(layer.weight, std=0.5)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return 30.0 * torch.tanh(logits / 30.0) if self.post == "soft_cap" else logits.double()


@pytest.mark.parametrize("post", ["soft_cap", "cast"])
def test_a_model_output_computed_from_the_readout_may_shrink_like_it(post: str) -> None:
    result = coord_check(
        lambda width: PostProcessed(width, post),
        WIDTHS,
        [BATCH],
        steps=2,
        optimizer="adam",
        readout="out",
        loss_fn=cross_entropy,
    )
    assert result.passed, result.table()
    assert "<output>" in result.readout_outputs and result.slopes["<output>"][0] < -0.4


class Wrapped(pl.LightningModule):
    """The usual Lightning pattern: the network is an attribute (here ``attr``, maybe compiled), training_step calls
    it. Its weights have a width-independent std, so the readout's output shrinks like ``width^-1/2`` under muP."""

    def __init__(self, width: int, attr: str = "net", compiled: bool = False) -> None:
        super().__init__()
        net = MLP(width)
        for layer in (net.inp, net.hid, net.out):
            nn.init.normal_(layer.weight, std=0.5)
        setattr(self, attr, torch.compile(net, backend="eager") if compiled else net)
        self.attr = attr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return cross_entropy(getattr(self, self.attr), batch)


@pytest.mark.parametrize(
    ("attr", "compiled", "readout", "containers"),
    [
        ("net", False, "net.out", ["net"]),
        ("module", False, "module.out", ["module"]),  # a wrapper prefix: the plan names the readout "out"
        ("net", True, "net.out", ["net", "net._orig_mod"]),  # torch.compile: recorded as net._orig_mod.out
    ],
)
def test_readouts_under_wrappers_and_the_modules_returning_their_output_may_shrink(
    attr: str, compiled: bool, readout: str, containers: list[str]
) -> None:
    result = coord_check(
        lambda width: Wrapped(width, attr, compiled), WIDTHS, [BATCH], steps=1, optimizer="adam", readout=readout
    )
    assert result.passed, result.table()
    for name in containers:
        assert name in result.readout_outputs and result.slopes[name][0] < -0.4
    assert f"{containers[-1]}.out" in result.readout_outputs and f"{containers[-1]}.hid" not in result.readout_outputs


class Routed(nn.Module):
    """An MLP plus an expert that seed 0 skips (as stochastic depth would) and that the widest model routes no tokens
    (an empty output). The expert passes ones through, so its mean |output| is 1 wherever it runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp, self.expert, self.width = MLP(width), nn.Identity(), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.initial_seed() != 0:  # coord_check seeds each run with torch.manual_seed(seed)
            self.expert(torch.ones(0 if self.width == WIDTHS[-1] else 4, 2))
        return self.mlp(x)


def test_seeds_average_over_the_calls_and_modules_not_called_are_reported_not_failed() -> None:
    result = coord_check(
        Routed,
        WIDTHS,
        [BATCH],
        steps=2,
        optimizer="adam",
        readout="mlp.out",
        model_init="torch_default",
        loss_fn=cross_entropy,
    )
    assert result.calls["expert"] == [[2, 2, 2, 0]] * 2  # seeds 1 and 2; no tokens at width 128
    assert result.l1["expert"][0][:3] == [1.0] * 3 and math.isnan(result.l1["expert"][0][3])  # not 2/3, not 0
    assert result.passed, result.table()
    assert result.not_called() == [f"expert t={t}: not called at width 128" for t in (1, 2)]
    assert "not checked: expert t=1: not called at width 128" in result.table() and "n/c" in result.table()
    assert result.to_dict()["not_called"] == result.not_called()


def test_slope_is_the_log_log_least_squares_fit() -> None:
    x = [math.log2(w) for w in (16, 32, 64, 128)]
    assert _slope(x, [3.0 * w**0.5 for w in (16, 32, 64, 128)]) == pytest.approx(0.5, abs=1e-12)
    assert _slope(x, [1.0, 2.0, 2.0, 4.0]) == pytest.approx(0.6, abs=1e-12)  # hand-computed: cov 1.5 / var 2.5
    assert math.isnan(_slope(x, [0.0, 1.0, 1.0, 1.0]))


def test_outputs_tuples_dicts_none_and_repeated_calls() -> None:
    t = torch.tensor([[1.0, -3.0]])
    found = _output_tensors("m", (t, None, {"k": 2 * t, "ids": torch.ones(2, dtype=torch.long)}))
    assert [name for name, _ in found] == ["m[0]"]  # nested containers are not walked; None and ints skipped
    found = _output_tensors("m", {"hidden": t, "mask": None, "ids": torch.ones(2, dtype=torch.long)})
    assert [(name, mean_abs(value)) for name, value in found] == [("m[hidden]", 2.0)]
    assert _output_tensors("m", None) == []
    assert _output_tensors("m", (torch.ones(0, 4), t)) == [("m[1]", t)]  # an empty output counts as no call

    recorder = _Recorder(readouts=[])
    layer = nn.Linear(2, 2, bias=False)
    nn.init.eye_(layer.weight)
    layer.register_forward_hook(recorder.hook("layer", is_readout=False))
    layer(torch.tensor([[1.0, -1.0]]))
    layer(torch.tensor([[3.0, 3.0]]))  # called twice in one forward: mean over calls
    assert recorder.records["layer"] == [1.0 + 3.0, 2]


def test_mean_abs_is_float32_and_reduces_dtensor_shards(tmp_path: Path) -> None:
    halves = torch.tensor([1.0, -1.0078125] * 512, dtype=torch.bfloat16)  # neighbouring bf16 values
    assert halves.abs().mean().item() != 1.00390625  # bf16 cannot hold the mean ...
    assert mean_abs(halves) == 1.00390625  # ... float32 can
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        values = torch.tensor([[1.0, -2.0], [3.0, -6.0]])
        assert mean_abs(distribute_tensor(values, mesh, [Shard(0)])) == 3.0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": [16, 32, 64]}, "at least 4 positive widths on a x2 grid"),
        ({"widths": [16, 32, 48, 64]}, "x2 grid"),
        ({"widths": [16.9, 32, 64, 128]}, "widths must be integers"),
        ({"seeds": 2}, "seeds must be >= 3"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"batches": []}, "at least one batch"),
    ],
)
def test_bad_arguments(batches, kwargs: dict, message: str) -> None:
    arguments = {"widths": WIDTHS, "batches": batches, **kwargs}
    with pytest.raises(ValueError, match=message):
        coord_check(GPT, arguments.pop("widths"), arguments.pop("batches"), model_args=TINY, **arguments)


TINY_ARGS = [
    "--model-args",
    "depth=1",
    "head_dim=8",
    "context_length=8",
    "--data-args",
    "context_length=8",
    "batch_size=4",
    "max_bytes=20000",
    "max_val_bytes=2048",
    "--widths",
    *map(str, WIDTHS),
]


class SignSGD(torch.optim.Optimizer):
    """An Adam-like optimizer (entrywise-normalised steps) that is no torch.optim.Adam, so muP cannot detect it."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_cli_takes_the_mup_callback_optimizer_family(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "examples" / "configs" / "gpt_mup.yaml").read_text())
    config["optimizer"] = {"class_path": f"{__name__}.SignSGD", "init_args": {"lr": 0.02}}
    (mup_callback,) = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith(".MuP")]
    mup_callback["init_args"]["optimizer_family"] = "adam"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(tmp_path / "config.yaml"), *TINY_ARGS, "--steps", "2", "--no-sp", "--out", str(tmp_path)]
    assert main(args) == 0
    assert json.loads((tmp_path / "coord_check_mup.json").read_text())["optimizer"] == "SignSGD"
    with pytest.raises(ValueError, match="optimizer_family must be one of"):
        coord_check(GPT, WIDTHS, [None], model_args=TINY, optimizer=SignSGD, optimizer_family="lion")


def test_cli_writes_json_png_tensorboard_and_exit_code(tmp_path: Path, capsys) -> None:
    args = [
        "--config",
        str(REPO / "examples" / "configs" / "gpt_mup.yaml"),
        *TINY_ARGS,
        "--steps",
        "2",
        "--seeds",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--tensorboard",
        str(tmp_path / "tb"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mup: PASS" in printed and "sp: FAIL" in printed and "SP passed too" not in printed
    result = json.loads((tmp_path / "out" / "coord_check_mup.json").read_text())
    assert result["passed"] and result["widths"] == WIDTHS and result["optimizer"] == "AdamW"
    assert set(result["slopes"]) >= {"head", "blocks.0.mlp.fc", "<output>"}
    for name in ("coord_check_mup.png", "coord_check_sp.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert main([*args[:-4], "--steps", "1", "--no-sp", "--tolerance", "0.001"]) == 1  # muP fails: exit status 1


class Classifier(pl.LightningModule):
    """A model whose width argument is ``d_model``, not ``width``."""

    def __init__(self, d_model: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mlp = MLP(d_model)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return cross_entropy(self.mlp, batch)


class Blobs(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16) -> None:  # LightningDataModule itself takes any keyword
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.data = torch.utils.data.TensorDataset(*BATCH)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size)


def classifier_config(tmp_path: Path, **mup_args) -> str:
    mup_args = {"readout": "mlp.out", "model_init": "torch_default", **mup_args}
    config = {
        "trainer": {"callbacks": [{"class_path": "lightning_power.mup.MuP", "init_args": mup_args}]},
        "model": {"class_path": f"{__name__}.Classifier", "init_args": {"d_model": 64}},
        "data": {"class_path": f"{__name__}.Blobs"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(tmp_path / "config.yaml")


def test_cli_takes_the_width_argument_from_the_mup_callback_or_width_arg(tmp_path: Path, capsys) -> None:
    fixed = ["--widths", *map(str, WIDTHS), "--steps", "2", "--no-sp", "--out", str(tmp_path)]
    config = classifier_config(tmp_path, base_overrides={"d_model": 16}, delta_overrides={"d_model": 32})
    assert main(["--config", config, *fixed]) == 0
    assert json.loads((tmp_path / "coord_check_mup.json").read_text())["passed"]

    ambiguous = {"base_overrides": {"d_model": 16, "d_ff": 64}, "delta_overrides": {"d_model": 32, "d_ff": 128}}
    config = classifier_config(tmp_path, **ambiguous)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", config, *fixed])
    assert (
        exit_info.value.code == 2
        and "d_model, d_ff of their keys could be the width; pass --width-arg" in capsys.readouterr().err
    )
    assert main(["--config", config, "--width-arg", "d_model", *fixed]) == 0

    assert _width_arg({}) == "width"
    assert _width_arg({"base_overrides": {"d_model": 16}}) == "d_model"
    assert _width_arg({"base_overrides": {"d_model": 16, "depth": 2}, "delta_overrides": {"d_model": 32, "depth": 2}})
    with pytest.raises(ValueError, match="none of their keys could be the width"):
        _width_arg({"base_overrides": {"d_model": 16}, "delta_overrides": {"d_model": 16}})


def test_cli_passes_the_config_optimizer_arguments_to_the_check(tmp_path: Path) -> None:
    config = yaml.safe_load(Path(classifier_config(tmp_path, base_overrides={"d_model": 16})).read_text())
    optimizer_args = {"momentum": 0.9, "weight_decay": 0.01}
    config["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, **optimizer_args}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fixed = ["--widths", *map(str, WIDTHS), "--steps", "3", "--no-sp", "--out", str(tmp_path)]
    assert main(["--config", str(tmp_path / "config.yaml"), *fixed]) == 0
    cli = json.loads((tmp_path / "coord_check_mup.json").read_text())

    direct = coord_check(
        Classifier,
        WIDTHS,
        [BATCH],
        width_arg="d_model",
        steps=3,  # momentum and weight decay shape the forward of step 3
        optimizer=torch.optim.SGD,
        optimizer_args=optimizer_args,
        readout="mlp.out",
        model_init="torch_default",
    )
    assert cli["optimizer"] == "SGD" and cli["lr"] == 2**-6  # the check's own LR, not the config's
    assert cli["l1"] == direct.l1


def test_cli_warns_when_sp_passes_too(tmp_path: Path, capsys) -> None:
    config = classifier_config(tmp_path, base_overrides={"d_model": 16}, delta_overrides={"d_model": 32})
    args = ["--config", config, "--widths", *map(str, WIDTHS), "--steps", "1", "--out", str(tmp_path)]
    assert main([*args, "--tolerance", "5"]) == 0
    printed = capsys.readouterr().out
    assert "sp: PASS" in printed
    assert "warning: SP passed too, so this check cannot tell the parametrizations apart" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--widths", "16", "32", "64"], "at least 4 positive widths"),
        (["--widths", "16", "32", "64", "128.5"], "invalid int value: '128.5'"),
        (["--seeds", "2"], "seeds must be >= 3"),
        (["--model-args", "d_model"], "--model-args takes KEY=VALUE pairs, got 'd_model'"),
        (["--model-args", "depth=2"], "unexpected keyword argument 'depth'"),
        (["--width-arg", "width"], "unexpected keyword argument 'width'"),
        (["--data-args", "batch_szie=4"], "cannot build the data module Blobs"),
    ],
)
def test_cli_bad_input_exits_2_not_1(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    config = classifier_config(tmp_path, base_overrides={"d_model": 16})
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", config, "--widths", *map(str, WIDTHS), *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ({"class_path": "torch.optim.Adafactor"}, "optimizer 'Adafactor': Adafactor scales each update by RMS"),
        ({"class_path": f"{__name__}.SignSGD"}, "pass optimizer_family='adam'.*in the config's MuP callback"),
        ({"class_path": "torch.optim.AdamW", "init_args": {"betaz": [0.9, 0.95]}}, r"cannot build AdamW\(params"),
    ],
)
def test_cli_optimizer_muP_cannot_use_or_build_exits_2(tmp_path: Path, capsys, optimizer: dict, message: str) -> None:
    config = yaml.safe_load(Path(classifier_config(tmp_path, base_overrides={"d_model": 16})).read_text())
    config["optimizer"] = optimizer
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "config.yaml"), "--widths", *map(str, WIDTHS), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_numbers_in_exponent_form_are_read_as_the_cli_reads_them(tmp_path):
    # YAML 1.1 (PyYAML's safe_load) reads 1e-8 as a string; jsonargparse, behind `lightning-power fit`, as a number
    config = tmp_path / "config.yaml"
    config.write_text("optimizer:\n  init_args:\n    eps: 1e-8\n    lr: 3.0e-3\n    betas: [0.9, 0.95]\n")
    assert _load_config(str(config))["optimizer"]["init_args"] == {"eps": 1e-8, "lr": 3e-3, "betas": [0.9, 0.95]}
    assert _key_values(["init_std=1e-2", "width=64", "name=1e"], "--model-args") == {
        "init_std": 0.01,
        "width": 64,
        "name": "1e",
    }
