"""Kill a real training job with SIGKILL and resume it from its last checkpoint: nothing may differ.

The train split is 5 batches an epoch, read by 2 DataLoader worker processes: the job is killed in epoch 1, resumes
mid-epoch from step 8 and runs through two more epoch boundaries.
"""

import pytest
import torch

from tests.helpers.callbacks import final_weights, read_records
from tests.helpers.jobs import CONFIGS, run_cli
from tests.helpers.recipe import fit_until_killed
from tests.helpers.tiny import tiny_cli_args


def _fit_args(records, extra=()):
    return [
        "fit",
        "--config",
        str(CONFIGS / "gpt_demo.yaml"),
        *tiny_cli_args(max_steps=14),
        "--data.init_args.max_bytes=700",  # 43 windows of 16 bytes: 5 batches of 8 an epoch
        "--data.init_args.num_workers=2",
        "--trainer.logger=false",
        "--trainer.val_check_interval=100",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath=ckpt",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=tests.helpers.callbacks.RecordSteps",
        f"--trainer.callbacks.path={records}",
        *extra,
    ]


@pytest.mark.distributed
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_cli(_fit_args("steps.jsonl"), tmp_path / "a")

    kill = ["--trainer.callbacks+=tests.helpers.callbacks.KillAtStep", "--trainer.callbacks.step=10"]
    fit_until_killed(tmp_path / "b", _fit_args("steps.jsonl", kill))
    assert max(read_records(tmp_path / "b" / "steps.jsonl")) == 10
    run_cli(_fit_args("steps.jsonl", ["--ckpt_path=ckpt/last.ckpt"]), tmp_path / "b")

    uninterrupted, resumed = read_records(tmp_path / "a" / "steps.jsonl"), read_records(tmp_path / "b" / "steps.jsonl")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 15))
    for step in uninterrupted:
        assert resumed[step]["first_bytes"] == uninterrupted[step]["first_bytes"], f"data differs at step {step}"
        assert resumed[step]["lrs"] == uninterrupted[step]["lrs"]
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], f"loss differs at step {step}"
    weights_a = final_weights(tmp_path / "a" / "ckpt" / "last.ckpt")
    weights_b = final_weights(tmp_path / "b" / "ckpt" / "last.ckpt")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
