"""2-process CPU (gloo) fits through the console script with the shipped strategy configs: DDP, FSDP1, FSDP2."""

import pytest

from tests.helpers.jobs import CONFIGS, read_metrics, run_cli
from tests.helpers.tiny import tiny_cli_args


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2"])
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
