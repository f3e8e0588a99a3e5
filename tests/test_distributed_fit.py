"""2-process CPU (gloo) fits through the console script with the shipped strategy configs: DDP, FSDP1, FSDP2."""

import os

import pytest

from tests.helpers.jobs import CONFIGS, read_metrics, run_cli
from tests.helpers.tiny import tiny_cli_args
from tests.helpers.versions import cpu_fsdp2


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("fsdp2", marks=cpu_fsdp2)])
def test_two_process_fit_trains(strategy, tmp_path):
    args = [
        "fit",
        "--config",
        str(CONFIGS / "gpt_demo.yaml"),
        "--config",
        str(CONFIGS / f"strategy_{strategy}.yaml"),
        *tiny_cli_args(max_steps=12),
        "--trainer.devices=2",
        "--optimizer.lr=0.01",
    ]
    run_cli(args, tmp_path)
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    losses = [value for _, value in metrics["train/loss"]]
    # The optimizer holds the parameters the strategy trains (not stale pre-sharding copies): the loss falls.
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert metrics["val/bpb"][-1][1] < 8.0


def test_fsdp1_on_cpu_refuses_full_checkpoints_before_torch_2_14(monkeypatch, tmp_path):
    """torch < 2.14 segfaults saving FSDP1's full state dict on CPU; the strategy says so before training starts."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from torch.torch_version import TorchVersion

    from lightning_power.strategies import FSDPStrategy

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.13.0+cpu"))
    environment = set(os.environ)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDPStrategy(), max_steps=1, logger=False)
    try:
        with pytest.raises(ValueError, match=r"state_dict_type='full' needs torch >= 2.14 \(this is 2.13.0\+cpu\)"):
            trainer.fit(BoringModel())
    finally:  # the process group and the rendezvous variables (MASTER_PORT ...) Lightning set up: leave none behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for variable in set(os.environ) - environment:
            del os.environ[variable]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fsdp2_over_cpu_processes_is_refused_before_torch_2_9(monkeypatch):
    """torch < 2.9 sums FSDP2's gradients over gloo instead of averaging them; the strategy refuses such a run."""
    import torch
    from torch.torch_version import TorchVersion

    from lightning_power.strategies import ModelParallelStrategy

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))
    strategy = ModelParallelStrategy(tensor_parallel_size=1)  # FSDP2 on every process, as strategy_fsdp2.yaml
    strategy.parallel_devices = [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match=r"over 2 data-parallel CPU processes needs torch >= 2.9 \(this is 2.8.0\)"):
        strategy.setup_environment()
