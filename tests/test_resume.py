"""Kill a real training job with SIGKILL and resume it from its last checkpoint: nothing may differ.

The train split is 5 batches an epoch, so the resumed job finishes one epoch and runs through the next two.
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
        *tiny_cli_args(max_steps=12),
        "--data.init_args.max_bytes=700",  # 43 windows of 16 bytes: 5 batches of 8 an epoch
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

    kill = ["--trainer.callbacks+=tests.helpers.callbacks.KillAtStep", "--trainer.callbacks.step=6"]
    fit_until_killed(tmp_path / "b", _fit_args("steps.jsonl", kill))
    assert max(read_records(tmp_path / "b" / "steps.jsonl")) == 6
    run_cli(_fit_args("steps.jsonl", ["--ckpt_path=ckpt/last.ckpt"]), tmp_path / "b")

    uninterrupted, resumed = read_records(tmp_path / "a" / "steps.jsonl"), read_records(tmp_path / "b" / "steps.jsonl")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))
    for step in uninterrupted:
        assert resumed[step]["first_bytes"] == uninterrupted[step]["first_bytes"], f"data differs at step {step}"
        assert resumed[step]["lrs"] == uninterrupted[step]["lrs"]
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], f"loss differs at step {step}"
    weights_a = final_weights(tmp_path / "a" / "ckpt" / "last.ckpt")
    weights_b = final_weights(tmp_path / "b" / "ckpt" / "last.ckpt")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
