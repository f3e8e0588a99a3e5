"""2-process CPU (gloo) fits through the console script: DDP and ModelParallelStrategy (FSDP2)."""

import pytest

from tests.helpers.jobs import CONFIGS, read_metrics, run_cli
from tests.helpers.tiny import tiny_cli_args

STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": [
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2",
        "--trainer.strategy.tensor_parallel_size=1",
    ],
}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_process_fit_trains(strategy, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "gpt_demo.yaml"), *tiny_cli_args(max_steps=12), "--trainer.devices=2",
            "--optimizer.lr=0.01", *STRATEGIES[strategy]]
    run_cli(args, tmp_path)
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    losses = [value for _, value in metrics["train/loss"]]
    # The optimizer holds the parameters the strategy trains (not stale pre-sharding copies): the loss falls.
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert metrics["val/bpb"][-1][1] < 8.0
