"""Every feature at once (muP, Power scheduler with a TokenCounter, UpdateSparsityMonitor) under every strategy,
through the console script with the shipped recipe and strategy configs; then SIGKILL and resume.

The global batch is the same everywhere (8 sequences: 8 on one process, 4 on each of two), so every strategy sees the
same samples in the same steps and must produce the same run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.callbacks import read_records
from tests.helpers.jobs import CONFIGS, job_env
from tests.helpers.recipe import (
    MAX_STEPS,
    TOKENS_PER_STEP,
    checkpoint_weights,
    fit_in,
    fit_until_killed,
    recipe_args,
    sparsity_history,
    train_losses,
)
from tests.helpers.versions import cpu_fsdp2


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    return fit_in(tmp_path_factory.mktemp("single"), recipe_args())


def test_single_process_run_uses_every_feature(single_run):
    records = read_records(single_run / "steps.jsonl")
    assert sorted(records) == list(range(1, MAX_STEPS + 1))
    assert [records[s]["tokens_seen"] for s in records] == [s * TOKENS_PER_STEP for s in records]
    lrs = [records[s]["lrs"] for s in sorted(records)]
    # muP: hidden matrices train at lr * base_width / width = half the LR of the vector-like groups.
    assert len(set(lrs[2])) >= 2 and min(lrs[2]) == pytest.approx(max(lrs[2]) / 2)
    # Power: warmup to the power-law value over 2 steps, then it falls and decays to 0 at the end.
    largest = [max(group_lrs) for group_lrs in lrs]
    assert largest[0] < largest[1] and largest[2] > largest[3] > largest[-1] and largest[-1] < largest[3] / 2
    history = sparsity_history(single_run)
    assert [step for step, _ in history] == [2, 4, 6, 8]
    for _, metrics in history:
        assert 0.0 < metrics["update_sparsity/total"] < 0.5  # embedding rows of bytes never seen stay unchanged
        assert 0.0 < metrics["update_sparsity/token_embedding"] < 1.0
    assert any(key.startswith("update_rank/") for _, metrics in history for key in metrics)
    assert (single_run / "csv" / "version_0" / "mup_params.csv").is_file()
    assert list((single_run / "csv" / "version_0" / "update_sparsity").glob("masks-*.npz"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``two_process_run(strategy)``: the recipe on two processes, run once per module."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = fit_in(tmp_path_factory.mktemp(strategy), recipe_args(devices=2, strategy=strategy))
        return runs[strategy]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("fsdp2", marks=cpu_fsdp2)])
def test_two_processes_reproduce_the_single_process_run(strategy, single_run, two_process_run):
    run = two_process_run(strategy)
    expected, records = read_records(single_run / "steps.jsonl"), read_records(run / "steps.jsonl")
    assert sorted(records) == sorted(expected)
    for step in expected:
        assert records[step]["lrs"] == expected[step]["lrs"], f"LRs differ at step {step}"
        assert records[step]["tokens_seen"] == expected[step]["tokens_seen"], f"token count differs at step {step}"
    expected_losses, losses = train_losses(single_run), train_losses(run)
    assert sorted(losses) == sorted(expected_losses)
    for step, loss in expected_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), f"loss differs at step {step}"
    expected_history, history = sparsity_history(single_run), sparsity_history(run)
    assert [step for step, _ in history] == [step for step, _ in expected_history]
    for (step, want), (_, got) in zip(expected_history, history):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key.startswith(("update_rank/", "update_stable_rank/")):  # an SVD of float sums in another order
                assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-6), f"{key} at step {step}"
            else:  # counts of bit-identical elements: exact
                assert got[key] == value, f"{key} at step {step}"


def _assert_resumed_equals_uninterrupted(uninterrupted: Path, resumed: Path, final_checkpoint: str) -> None:
    want, got = read_records(uninterrupted / "steps.jsonl"), read_records(resumed / "steps.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    for step in want:
        assert got[step]["first_bytes"] == want[step]["first_bytes"], f"data differs at step {step}"
        assert got[step]["lrs"] == want[step]["lrs"], f"LRs differ at step {step}"
        assert got[step]["tokens_seen"] == want[step]["tokens_seen"], f"token count differs at step {step}"
        assert got[step]["loss"] == want[step]["loss"], f"loss differs at step {step}"
    assert sparsity_history(resumed) == sparsity_history(uninterrupted)
    weights_want = checkpoint_weights(uninterrupted / "ckpt" / final_checkpoint)
    weights_got = checkpoint_weights(resumed / "ckpt" / final_checkpoint)
    assert weights_got.keys() == weights_want.keys()
    for name in weights_want:
        assert torch.equal(weights_got[name], weights_want[name]), name


@pytest.mark.distributed
def test_single_process_sigkill_and_resume_lose_nothing(single_run, tmp_path):
    run = tmp_path / "killed"
    fit_until_killed(
        run,
        recipe_args(extra=["--trainer.callbacks+=tests.helpers.callbacks.KillAtStep", "--trainer.callbacks.step=6"]),
    )
    assert max(read_records(run / "steps.jsonl")) == 6
    fit_in(run, recipe_args(extra=["--ckpt_path=ckpt/last.ckpt"]))
    _assert_resumed_equals_uninterrupted(single_run, run, "last.ckpt")


@pytest.mark.distributed
@cpu_fsdp2
def test_fsdp2_killed_while_saving_resumes_from_the_previous_complete_checkpoint(two_process_run, tmp_path):
    uninterrupted = two_process_run("fsdp2")
    run = tmp_path / "killed"
    kill_during_save = [
        "--trainer.strategy=tests.helpers.strategies.KillBeforeSwap",
        "--trainer.strategy.kill_at_step=6",
    ]
    fit_until_killed(run, recipe_args(devices=2, checkpoint_every=2, extra=kill_during_save))
    # Killed after every shard of step 6's last.ckpt was staged, before the swap: last.ckpt is still step 4's,
    # complete; the staged folder is never loaded and the next save clears it.
    assert max(read_records(run / "steps.jsonl")) == 6
    assert (run / "ckpt" / "last.ckpt.partial").is_dir() and (run / "ckpt" / "last.ckpt" / ".metadata").is_file()
    fit_in(run, recipe_args(devices=2, strategy="fsdp2", checkpoint_every=2, extra=["--ckpt_path=ckpt/last.ckpt"]))
    assert min(train_losses(run, version=1)) == 5  # resumed after step 4
    assert not (run / "ckpt" / "last.ckpt.partial").exists()
    _assert_resumed_equals_uninterrupted(uninterrupted, run, "last.ckpt")


# ------------------------------------------------------------------------------------------- faults and bad input


def fit_fails(directory: Path, args: list[str]) -> str:
    """Run a fit that must fail; return its stderr."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_power.cli", *args]
    result = subprocess.run(command, cwd=directory, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode not in (0, -9), f"expected a clean failure, got {result.returncode}"
    return result.stderr


def fingerprint(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under ``folder``: a failed resume must change none of them."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.distributed
def test_resume_with_changed_batch_size_or_width_is_refused_and_changes_nothing(single_run, tmp_path):
    checkpoints = fingerprint(single_run / "ckpt")
    resume = [f"--ckpt_path={single_run / 'ckpt' / 'last.ckpt'}"]
    batch = ["--data.init_args.batch_size=4"]
    stderr = fit_fails(tmp_path / "batch", recipe_args(max_steps=10, extra=[*resume, *batch]))
    assert (
        "ByteCorpus cannot resume mid-epoch with a changed global batch (batch_size x processes): 8 x 1 -> 4 x 1"
        in stderr
    )
    stderr = fit_fails(tmp_path / "width", recipe_args(max_steps=10, width=96, extra=resume))
    assert "this config changes the checkpoint's model: width=96 (checkpoint: 64)" in stderr
    assert fingerprint(single_run / "ckpt") == checkpoints


@pytest.mark.distributed
@cpu_fsdp2
def test_resume_on_another_number_of_processes_is_refused(two_process_run, tmp_path):
    run = two_process_run("fsdp2")
    checkpoints = fingerprint(run / "ckpt")
    resume = [f"--ckpt_path={run / 'ckpt' / 'last.ckpt'}"]
    stderr = fit_fails(tmp_path, recipe_args(devices=1, strategy="fsdp2", max_steps=10, extra=resume))
    # The data can continue (same global batch of 8), but the monitor's reference is sharded over two ranks.
    assert "UpdateSparsityMonitor cannot resume on 1 processes" in stderr
    wider = recipe_args(devices=2, strategy="fsdp2", max_steps=10, width=96, extra=resume)
    assert "changes the checkpoint's model: width=96 (checkpoint: 64)" in fit_fails(tmp_path / "wider", wider)
    assert fingerprint(run / "ckpt") == checkpoints


@pytest.mark.distributed
@cpu_fsdp2
def test_fsdp2_resumes_on_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    """Elastic resume: the 2-process FSDP2 checkpoint of step 4 continues on 1 process with a batch of 8 instead of
    2 x 4 (the sparsity monitor, whose snapshots are per-rank shards, is left out)."""
    uninterrupted = two_process_run("fsdp2")
    step4 = uninterrupted / "ckpt" / "epoch=0-step=4.ckpt"
    run = fit_in(tmp_path, recipe_args(strategy="fsdp2", sparsity=False, extra=[f"--ckpt_path={step4}"]))
    want, got = read_records(uninterrupted / "steps.jsonl"), read_records(run / "steps.jsonl")
    assert sorted(got) == list(range(5, MAX_STEPS + 1))
    for step in got:
        assert got[step]["first_bytes"] == want[step]["first_bytes"], f"data differs at step {step}"
        assert got[step]["lrs"] == want[step]["lrs"] and got[step]["tokens_seen"] == want[step]["tokens_seen"]
    losses_want, losses_got = train_losses(uninterrupted), train_losses(run)
    for step, loss in losses_got.items():
        assert loss == pytest.approx(losses_want[step], rel=1e-5), f"loss differs at step {step}"
    weights_want = checkpoint_weights(uninterrupted / "ckpt" / "last.ckpt")
    weights_got = checkpoint_weights(run / "ckpt" / "last.ckpt")
    for name, tensor in weights_want.items():
        torch.testing.assert_close(weights_got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_checkpoint_without_mup_is_refused_by_a_mup_run(tmp_path):
    plain = [
        "fit",
        "--config",
        str(CONFIGS / "gpt_power.yaml"),
        *[arg for arg in recipe_args(max_steps=4) if arg.startswith(("--model.", "--data.", "--trainer."))],
        "--model.init_args.attention_scale=1/d_head",  # the same model as the muP recipe's, trained without MuP
    ]
    fit_in(tmp_path / "plain", plain)
    resume = [f"--ckpt_path={tmp_path / 'plain' / 'ckpt' / 'last.ckpt'}"]
    stderr = fit_fails(tmp_path / "mup", recipe_args(extra=resume))
    assert "holds no muP state: it was not trained with the MuP callback" in stderr


@pytest.mark.distributed
def test_missing_sparsity_reference_is_a_clear_error(tmp_path):
    stderr = fit_fails(tmp_path / "given", recipe_args(monitor=["--trainer.callbacks.reference=no/such.ckpt"]))
    assert "reference must be 'fit_start' or an existing checkpoint file, got 'no/such.ckpt'" in stderr

    run = fit_in(tmp_path / "run", recipe_args(max_steps=4))
    for snapshot in (run / "csv" / "version_0" / "update_sparsity").glob("reference-*.pt"):
        snapshot.unlink()
    stderr = fit_fails(run, recipe_args(max_steps=6, extra=["--ckpt_path=ckpt/last.ckpt"]))
    assert "update-sparsity snapshot" in stderr and "is missing; it is needed to resume" in stderr


@pytest.mark.distributed
def test_unwritable_sparsity_log_dir_is_a_clear_error_and_checkpoints_stay_whole(tmp_path):
    blocked = tmp_path / "csv" / "version_0"
    blocked.mkdir(parents=True)
    (blocked / "update_sparsity").write_text("a file where the folder should be")
    stderr = fit_fails(tmp_path, recipe_args(max_steps=4, extra=["--trainer.logger.version=0"]))
    assert f"UpdateSparsityMonitor needs a writable folder '{blocked / 'update_sparsity'}'" in stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "steps.jsonl").exists()  # stopped before training
