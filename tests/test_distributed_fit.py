"""2-process CPU (gloo) fits through the console script with the shipped strategy configs: DDP, FSDP1, FSDP2."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_power.demo import ByteCorpus
from lightning_power.demo.data import ResumableShuffleSampler
from lightning_power.strategies import FSDPStrategy, replace_path
from tests.helpers.callbacks import read_batches
from tests.helpers.jobs import CONFIGS, read_metrics, run_cli
from tests.helpers.strategies import AdamBoringModel, sharded_fsdp_trainer
from tests.helpers.tiny import TINY_DATA, tiny_cli_args
from tests.helpers.versions import cpu_fsdp2

RECORD_BATCHES = ["--trainer.callbacks+=tests.helpers.callbacks.RecordBatches", "--trainer.callbacks.path=batches"]


def single_process_batches(steps: int, global_batch: int) -> list[list[list[int]]]:
    """Each step's global batch of the demo data (TINY_DATA) as one process draws it, rows in order."""
    corpus = ByteCorpus(**TINY_DATA)
    corpus.setup("fit")
    order = list(ResumableShuffleSampler(corpus.train_set, num_replicas=1, rank=0, seed=0))
    rows = [corpus.train_set[i][0].tolist() for i in order[: steps * global_batch]]
    return [rows[step * global_batch : (step + 1) * global_batch] for step in range(steps)]


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
        *RECORD_BATCHES,
    ]
    run_cli(args, tmp_path)
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    losses = [value for _, value in metrics["train/loss"]]
    # The optimizer holds the parameters the strategy trains (not stale pre-sharding copies): the loss falls.
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert metrics["val/bpb"][-1][1] < 8.0
    # Two data-parallel ranks split each step's global batch: together they read what one process would.
    per_rank = [read_batches(tmp_path / "batches", rank) for rank in (0, 1)]
    expected = single_process_batches(steps=12, global_batch=2 * TINY_DATA["batch_size"])
    assert [sorted(a + b) for a, b in zip(*per_rank)] == [sorted(batch) for batch in expected]


@pytest.mark.distributed
@cpu_fsdp2
def test_tokens_are_summed_over_the_data_parallel_ranks_only(tmp_path):
    """Two tensor-parallel ranks of one data-parallel replica read the same batches: each step holds one batch."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "gpt_demo.yaml"),
        "--config",
        str(CONFIGS / "strategy_fsdp2.yaml"),
        *tiny_cli_args(max_steps=3),
        "--trainer.devices=2",
        "--trainer.strategy.init_args.data_parallel_size=1",
        "--trainer.strategy.init_args.tensor_parallel_size=2",
        "--trainer.callbacks+=lightning_power.TokenCounter",
        *RECORD_BATCHES,
    ]
    run_cli(args, tmp_path)
    # Both ranks read the one replica's batches, the same as one process draws them.
    expected = single_process_batches(steps=3, global_batch=TINY_DATA["batch_size"])
    assert read_batches(tmp_path / "batches", 0) == read_batches(tmp_path / "batches", 1) == expected
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    batch_tokens = TINY_DATA["batch_size"] * TINY_DATA["context_length"]
    assert metrics["tokens/step"] == [(step, batch_tokens) for step in range(3)]
    assert metrics["tokens/seen"][-1] == (2, 3 * batch_tokens)


def test_fsdp1_on_cpu_refuses_full_checkpoints_before_torch_2_14(monkeypatch, tmp_path, in_process_group):
    """torch < 2.14 segfaults saving FSDP1's full state dict on CPU; the strategy says so before training starts."""
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.13.0+cpu"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDPStrategy(), max_steps=1, logger=False)
    with pytest.raises(ValueError, match=r"state_dict_type='full' needs torch >= 2.14 \(this is 2.13.0\+cpu\)"):
        trainer.fit(BoringModel())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fsdp1_on_cpu_leaves_a_model_wrapped_in_configure_model_as_it_is(in_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    class WrapsItself(BoringModel):
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 2))

        def configure_model(self):
            self.layer[0] = FullyShardedDataParallel(self.layer[0], device_id=torch.device("cpu"), use_orig_params=True)

    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=True, state_dict_type="sharded")
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False)
    model = WrapsItself()
    with pytest.warns(UserWarning, match="already wrapped. The policy will be ignored"):
        trainer.fit(model)
    assert trainer.global_step == 2 and trainer.strategy.model is model  # the root is not wrapped again
    assert isinstance(model.layer[0], FullyShardedDataParallel)
    assert not isinstance(model.layer[1], FullyShardedDataParallel)  # the auto_wrap_policy {nn.Linear} was dropped


def test_a_resume_falls_back_to_the_checkpoint_a_stopped_swap_left_aside(tmp_path, in_process_group):
    first = sharded_fsdp_trainer(tmp_path, max_steps=2)
    first.fit(AdamBoringModel())
    first.save_checkpoint(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").rename(tmp_path / "last.ckpt.old")  # a kill between the swap's two renames
    resumed = sharded_fsdp_trainer(tmp_path, max_steps=4)
    with pytest.warns(UserWarning, match="last.ckpt' is missing: a save was stopped"):
        resumed.fit(AdamBoringModel(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4  # continued from step 2
    resumed.save_checkpoint(tmp_path / "last.ckpt")  # swaps in the new one, and only then drops the old one
    assert sorted(path.name for path in tmp_path.iterdir() if "ckpt" in path.name) == ["last.ckpt"]


def test_a_sharded_save_replaces_a_last_ckpt_symlink_not_its_target(tmp_path):
    """ModelCheckpoint(save_last="link") makes last.ckpt a link to a checkpoint folder; the swap replaces the link."""
    target = tmp_path / "epoch=0-step=2.ckpt"
    target.mkdir()
    (target / "meta.pt").write_bytes(b"step 2")
    (tmp_path / "last.ckpt").symlink_to(target.name)
    staging = tmp_path / "last.ckpt.partial"
    staging.mkdir()
    (staging / "meta.pt").write_bytes(b"step 3")
    replace_path(staging, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"step 3"
    assert (target / "meta.pt").read_bytes() == b"step 2"  # the linked checkpoint is kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_fsdp2_over_cpu_processes_is_refused_before_torch_2_9(monkeypatch):
    """torch < 2.9 sums FSDP2's gradients over gloo instead of averaging them; the strategy refuses such a run."""
    from torch.torch_version import TorchVersion

    from lightning_power.strategies import ModelParallelStrategy

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))
    strategy = ModelParallelStrategy(tensor_parallel_size=1)  # FSDP2 on every process, as strategy_fsdp2.yaml
    strategy.parallel_devices = [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match=r"over 2 data-parallel CPU processes needs torch >= 2.9 \(this is 2.8.0\)"):
        strategy.setup_environment()
