"""The coordinate check: muP flat, SP and a broken muP not; statistics, outputs, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from lightning_power.demo import GPT
from lightning_power.mup.coord_check import _failure, _output_tensors, _recorder, _slope, coord_check, main, mean_abs

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


def mlp_check(lr: float, zero_readout: bool = False):
    batch = (torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3)
    return coord_check(
        lambda width: MLP(width, zero_readout),
        WIDTHS,
        [batch],
        steps=3,
        lr=lr,
        optimizer="sgd",
        readout="out",
        model_init="torch_default",
        loss_fn=lambda net, b: nn.functional.cross_entropy(net(b[0]), b[1]),
    )


def test_values_that_blow_up_fail_and_zero_init_passes_at_step_1() -> None:
    blown = mlp_check(lr=1e8)  # mean |output| reaches inf at step 3 at every width, so every slope is NaN
    assert not blown.passed and math.isinf(blown.l1["hid"][2][0])
    assert "hid t=3: mean |output| is not finite (inf, inf, inf, inf by width)" in blown.failures
    assert "hid " in blown.table() and "nan!" in blown.table()
    zero = mlp_check(lr=0.1, zero_readout=True)
    assert zero.passed, zero.table()
    assert zero.l1["out"][0] == [0.0] * 4 and math.isnan(zero.slopes["out"][0])
    assert (
        _failure("m", 1, [0.0, 1.0, 1.0, 1.0], math.nan, False, 0.4)
        == "m t=1: mean |output| is 0 (0, 1, 1, 1 by width)"
    )
    assert _failure("m", 2, [0.0] * 4, math.nan, False, 0.4) == "m t=2: mean |output| is 0 (0, 0, 0, 0 by width)"
    assert _failure("m", 1, [1.0, math.nan, 1.0, 1.0], 0.0, False, 0.4) is not None


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

    records: dict = {}
    layer = nn.Linear(2, 2, bias=False)
    nn.init.eye_(layer.weight)
    layer.register_forward_hook(_recorder(records, "layer"))
    layer(torch.tensor([[1.0, -1.0]]))
    layer(torch.tensor([[3.0, 3.0]]))  # called twice in one forward: mean over calls
    assert records["layer"] == [1.0 + 3.0, 2]


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
    assert "mup: PASS" in printed and "sp: FAIL" in printed
    result = json.loads((tmp_path / "out" / "coord_check_mup.json").read_text())
    assert result["passed"] and result["widths"] == WIDTHS and result["optimizer"] == "AdamW"
    assert set(result["slopes"]) >= {"head", "blocks.0.mlp.fc", "<output>"}
    for name in ("coord_check_mup.png", "coord_check_sp.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert main([*args[:-4], "--steps", "1", "--no-sp", "--tolerance", "0.001"]) == 1  # muP fails: exit status 1
