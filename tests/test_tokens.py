"""TokenCounter: the counting rule, the LR each optimizer step uses under a batch ramp, padding, resume, bad setups."""

import itertools
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_power import tokens as tokens_module
from lightning_power.schedulers import PowerScheduler, WSDScheduler
from lightning_power.tokens import TokenCounter, count_tokens
from tests.helpers.jobs import CONFIGS, read_metrics
from tests.helpers.tiny import tiny_cli_args
from tests.test_schedulers import CONTEXT, ScheduledGPT, reference_power


def test_default_counting_rule():
    assert count_tokens(torch.zeros(3, 5)) == 15
    assert count_tokens((torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))) == 8  # (inputs, targets)
    assert count_tokens(["a label", torch.zeros(6)]) == 6  # the first tensor
    assert count_tokens((torch.zeros(2, 4), torch.zeros(2))) == 8  # (inputs, one label per sequence)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert int(count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask})) == 5  # padding excluded
    assert count_tokens({"input_ids": torch.zeros(2, 4)}) == 8
    assert int(count_tokens({"ids": torch.zeros(2, 4), "valid": mask.bool()}, mask_key="valid")) == 5
    assert count_tokens({"ids": torch.zeros(2, 3)}, tokens_key="ids") == 6


@pytest.mark.parametrize("batch", [{"pixels": torch.zeros(2)}, 3.0, ("no", "tensors")])
def test_uncountable_batch_raises(batch):
    with pytest.raises(TypeError, match="count_fn"):
        count_tokens(batch)


def test_a_four_dimensional_attention_mask_is_refused_not_summed():
    causal = torch.ones(2, 1, 4, 4).tril()  # a packing collator's (batch, 1, query, key) mask: sums to 20, not 8
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 1, 4, 4\).*count_fn"):
        count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": causal})
    with pytest.raises(TypeError, match=r"attention_mask.*NoneType.*count_fn"):
        count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": None})


def test_count_fn_must_be_callable():
    with pytest.raises(TypeError, match="count_fn"):
        TokenCounter(count_fn=5)


def ramp_batches(sizes: list[int]) -> DataLoader:
    """A loader whose i-th batch has ``sizes[i]`` byte sequences of ``CONTEXT`` tokens, in a fixed order."""
    data = torch.randint(0, 256, (sum(sizes), CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    starts = itertools.accumulate([0, *sizes])
    batches = [list(range(start, start + size)) for start, size in zip(starts, sizes)]
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_sampler=batches)


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def power(optimizer):
    return PowerScheduler(optimizer, a=4.0, b=-0.5, warmup_tokens=40)


def test_power_follows_a_batch_ramp_across_gradient_accumulation(tmp_path):
    counter = TokenCounter()
    model = ScheduledGPT(power)
    fit_trainer = trainer(
        3, callbacks=[counter], accumulate_grad_batches=2, logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    fit_trainer.fit(model, ramp_batches([2, 2, 4, 4, 6, 6]))
    step_tokens = [(2 + 2) * CONTEXT, (4 + 4) * CONTEXT, (6 + 6) * CONTEXT]
    seen = list(itertools.accumulate(step_tokens))
    expected = [reference_power(n, batch, 0.02, warmup=40) for n, batch in zip(seen, step_tokens)]
    assert model.used_lrs == pytest.approx(expected, rel=1e-12)
    assert model.scheduler.last_epoch == 3 and counter.tokens_seen == seen[-1]
    metrics = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert metrics["tokens/seen"] == list(enumerate(seen))
    assert metrics["tokens/step"] == list(enumerate(step_tokens))


class SkipsRestOfFirstEpoch(ScheduledGPT):
    """Ends epoch 0 at batch ``skip_at`` by returning -1 from ``on_train_batch_start``: that batch never trains."""

    def __init__(self, make_scheduler, skip_at: int) -> None:
        super().__init__(make_scheduler)
        self.skip_at = skip_at

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.current_epoch == 0 and batch_idx == self.skip_at else None


@pytest.mark.parametrize(
    ("skip_at", "accumulate", "stepped"),
    [
        (2, 1, [2, 3] + [2, 3, 5, 7]),  # epoch 0 stops before its batch of 5; epoch 1 trains all four
        (0, 1, [2, 3, 5, 7]),  # before the first step: the first measured step comes in epoch 1
        (3, 2, [2 + 3] + [2 + 3, 5 + 7]),  # cuts a window short: Lightning zeroes the batch of 5's gradients
    ],
)
def test_batches_the_module_skips_with_minus_one_are_not_counted(skip_at, accumulate, stepped):
    # Lightning also steps the scheduler at the skipped batch; that step must not count tokens either.
    model = SkipsRestOfFirstEpoch(power, skip_at)
    assert_counts_only_trained_batches(model, stepped, accumulate_grad_batches=accumulate)


def assert_counts_only_trained_batches(model: ScheduledGPT, stepped: list[int], **trainer_kwargs) -> None:
    """Fits 2 epochs of batches of 2, 3, 5 and 7 sequences; ``stepped`` lists the sequences of each optimizer step."""
    counter = TokenCounter()
    fit_trainer = trainer(len(stepped), callbacks=[counter], max_epochs=2, **trainer_kwargs)
    fit_trainer.fit(model, ramp_batches([2, 3, 5, 7]))
    assert fit_trainer.global_step == len(stepped)
    seen = list(itertools.accumulate(size * CONTEXT for size in stepped))
    assert counter.tokens_seen == seen[-1]
    expected = [reference_power(n, size * CONTEXT, 0.02, warmup=40) for n, size in zip(seen, stepped)]
    assert model.used_lrs == pytest.approx(expected, rel=1e-12)


class ManualSkipsRestOfFirstEpoch(SkipsRestOfFirstEpoch):
    """The same under manual optimization: the module steps its scheduler, Lightning never does, not even at -1."""

    def __init__(self, make_scheduler, skip_at: int) -> None:
        super().__init__(make_scheduler, skip_at)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.manual_backward(self.loss(batch))
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()


def test_under_manual_optimization_a_batch_the_module_skips_is_not_counted():
    stepped = [2, 3] + [2, 3, 5, 7]  # epoch 0 stops before its batch of 5
    assert_counts_only_trained_batches(ManualSkipsRestOfFirstEpoch(power, skip_at=2), stepped)


@pytest.mark.parametrize(("accumulate", "ranks"), [(2, 1), (1, 2)])
def test_the_lr_logged_before_the_first_step_is_the_one_it_uses_while_the_batch_is_constant(
    tmp_path, monkeypatch, accumulate, ranks
):
    if ranks > 1:  # no process group on CPU here: every other rank reads a batch of the same size
        monkeypatch.setattr(tokens_module, "_data_parallel_size", lambda trainer: ranks)
        monkeypatch.setattr(tokens_module, "_global_sum", lambda local, trainer: ranks * int(local))
    model = ScheduledGPT(power)
    callbacks = [TokenCounter(), LearningRateMonitor()]
    fit_trainer = trainer(
        2, callbacks=callbacks, accumulate_grad_batches=accumulate, logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    fit_trainer.fit(model, ramp_batches([3] * 2 * accumulate))
    step_tokens = 3 * CONTEXT * accumulate * ranks
    assert model.used_lrs[0] == pytest.approx(reference_power(step_tokens, step_tokens, 0.02, warmup=40), rel=1e-12)
    logged = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")["lr-AdamW"]
    assert logged[0] == (0, pytest.approx(model.used_lrs[0], rel=1e-6))


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers: each ``step()`` adds one to ``trainer.global_step``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Embedding(256, 4), torch.nn.Linear(4, 256)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = torch.nn.functional.cross_entropy(self.b(self.a(inputs)).flatten(0, 1), targets.flatten())
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()
            optimizer.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_tokens_are_logged_every_n_batches_also_when_two_optimizers_step_each_batch(tmp_path):
    sizes = [2, 3, 4, 5, 6, 7]
    fit_trainer = trainer(2 * len(sizes), callbacks=[TokenCounter()], logger=CSVLogger(tmp_path), log_every_n_steps=2)
    fit_trainer.fit(TwoOptimizers(), ramp_batches(sizes))
    assert fit_trainer.global_step == 2 * len(sizes)
    seen = list(itertools.accumulate(size * CONTEXT for size in sizes))
    metrics = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert metrics["tokens/seen"] == [(1, seen[1]), (3, seen[3]), (5, seen[5])]  # every 2nd batch, as Lightning logs


class TwoOptimizersOneTokenSchedule(TwoOptimizers):
    """TwoOptimizers with a token WSD on the first optimizer, stepped by the module once per batch."""

    def __init__(self, total_tokens: int) -> None:
        super().__init__()
        self.total_tokens = total_tokens

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.lr_schedulers().step()

    def configure_optimizers(self):
        first, second = super().configure_optimizers()
        scheduler = WSDScheduler(first, warmup=0, total=self.total_tokens, decay=CONTEXT, units="tokens")
        return [first, second], [{"scheduler": scheduler, "interval": "step"}]


def floor_warnings(warnings) -> list[str]:
    return [str(w.message) for w in warnings if "reaches its floor" in str(w.message)]


def test_two_optimizers_stepping_each_batch_do_not_make_a_schedule_look_short(recwarn):
    sizes = [4] * 4
    model = TwoOptimizersOneTokenSchedule(total_tokens=sum(sizes) * CONTEXT)  # ends with the fit
    fit_trainer = trainer(2 * len(sizes), callbacks=[TokenCounter()])  # max_steps counts both optimizers' steps
    fit_trainer.fit(model, ramp_batches(sizes))
    assert fit_trainer.global_step == 2 * len(sizes)
    assert not floor_warnings(recwarn)


class StopsAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_a_fit_without_an_end_runs_a_token_schedule_without_warning(recwarn):
    model = ScheduledGPT(lambda opt: WSDScheduler(opt, warmup=0, total=2 * 4 * CONTEXT, decay=CONTEXT, units="tokens"))
    fit_trainer = trainer(-1, max_epochs=-1, callbacks=[TokenCounter(), StopsAfter(3)])
    fit_trainer.fit(model, ramp_batches([4] * 4))
    assert fit_trainer.global_step == 3
    assert not floor_warnings(recwarn)


def test_a_step_without_tokens_names_the_cause():
    empty = {"input_ids": torch.zeros(2, CONTEXT + 1, dtype=torch.long), "attention_mask": torch.zeros(2, CONTEXT + 1)}
    model = MaskedGPT(lambda opt: WSDScheduler(opt, warmup=100, total=1000, decay=0, units="tokens"))
    with pytest.raises(ValueError, match="counted 0 tokens in an optimizer step .* every sequence padding"):
        trainer(1, callbacks=[TokenCounter()]).fit(model, DataLoader([empty], batch_size=None))
    counter = TokenCounter()  # without a token schedule, a step of 0 tokens is only counted
    plain = MaskedGPT(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    trainer(1, callbacks=[counter]).fit(plain, DataLoader([empty], batch_size=None))
    assert counter.tokens_seen == 0


STEP_TOKENS = 4 * CONTEXT  # ramp_batches([4] * 8)


def wsd_tokens(steps):
    return lambda opt: WSDScheduler(opt, warmup=0, total=steps * STEP_TOKENS, decay=STEP_TOKENS, units="tokens")


@pytest.mark.parametrize(
    ("make_scheduler", "message"),
    [
        pytest.param(
            wsd_tokens(3),
            "WSDScheduler reaches its floor at 96 tokens, after about 3 of the 8 optimizer steps",
            id="wsd",
        ),
        pytest.param(
            wsd_tokens(6), "WSDScheduler reaches its floor at 192 tokens, after about 6 of the 8", id="wsd-over-5%"
        ),
        pytest.param(
            lambda opt: PowerScheduler(opt, decay_tokens=STEP_TOKENS, total_tokens=6 * STEP_TOKENS),
            "PowerScheduler reaches its floor at 192 tokens, after about 6 of the 8",
            id="power",
        ),
    ],
)
def test_a_token_schedule_that_ends_well_before_max_steps_is_warned_about_once(make_scheduler, message):
    with pytest.warns(UserWarning) as record:
        trainer(8, callbacks=[TokenCounter()]).fit(ScheduledGPT(make_scheduler), ramp_batches([4] * 8))
    floors = floor_warnings(record)
    assert len(floors) == 1 and floors[0].startswith(message)


def test_a_schedule_that_ends_with_the_fit_or_counts_steps_is_not_warned_about(recwarn):
    trainer(8, callbacks=[TokenCounter()]).fit(ScheduledGPT(wsd_tokens(8)), ramp_batches([4] * 8))
    # max_epochs ends the fit first: max_steps is only a bound, not the planned length
    trainer(1000, max_epochs=1, callbacks=[TokenCounter()]).fit(ScheduledGPT(wsd_tokens(8)), ramp_batches([4] * 8))
    # a horizon in steps is no horizon in tokens
    steps = ScheduledGPT(lambda opt: WSDScheduler(opt, warmup=0, total=8, decay=2))
    trainer(8, callbacks=[TokenCounter()]).fit(steps, ramp_batches([4] * 8))
    assert not floor_warnings(recwarn)


class MaskedGPT(ScheduledGPT):
    """Trains on ``{"input_ids", "attention_mask"}`` batches (the mask only matters to the counter here)."""

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        return self.loss((ids[:, :-1], ids[:, 1:]))


def test_padding_is_not_counted():
    ids = torch.randint(0, 256, (8, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 3, 5, 9, 1, 2, 9, 7])
    mask = (torch.arange(CONTEXT + 1) < lengths[:, None]).long()
    loader = DataLoader(
        list(zip(ids, mask)),
        batch_size=4,
        collate_fn=lambda rows: {
            "input_ids": torch.stack([r[0] for r in rows]),
            "attention_mask": torch.stack([r[1] for r in rows]),
        },
    )
    counter = TokenCounter()
    model = MaskedGPT(lambda opt: WSDScheduler(opt, warmup=100, total=1000, decay=0, units="tokens"))
    trainer(2, callbacks=[counter]).fit(model, loader)
    assert counter.tokens_seen == int(lengths.sum()) == 45
    assert model.used_lrs == pytest.approx([0.02 * 26 / 100, 0.02 * 45 / 100], rel=1e-12)


def test_resume_reproduces_the_uninterrupted_lr_sequence_bit_for_bit(tmp_path):
    sizes = [2, 4, 6]  # one epoch = 3 optimizer steps with different batch sizes
    whole = ScheduledGPT(power)
    trainer(6, callbacks=[TokenCounter()]).fit(whole, ramp_batches(sizes))

    first = ScheduledGPT(power)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(3, callbacks=[TokenCounter(), checkpoint], enable_checkpointing=True).fit(first, ramp_batches(sizes))
    resumed, counter = ScheduledGPT(power), TokenCounter()
    trainer(6, callbacks=[counter]).fit(resumed, ramp_batches(sizes), ckpt_path=tmp_path / "step=3.ckpt")

    assert first.used_lrs + resumed.used_lrs == whole.used_lrs  # exact equality, not approx
    assert counter.tokens_seen == 2 * sum(sizes) * CONTEXT


@pytest.mark.parametrize(("interval", "frequency"), [("epoch", 1), ("step", 2)])
def test_a_token_scheduler_must_step_once_per_optimizer_step(interval, frequency):
    class Misconfigured(ScheduledGPT):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            config["lr_scheduler"].update(interval=interval, frequency=frequency)
            return config

    model = Misconfigured(lambda opt: PowerScheduler(opt, tokens_per_step=32))
    with pytest.raises(ValueError, match="interval='step' and frequency=1"):
        trainer(2, callbacks=[TokenCounter()]).fit(model, ramp_batches([4, 4]))


def test_power_without_tokens_per_step_or_counter_fails_in_fit():
    model = ScheduledGPT(lambda opt: PowerScheduler(opt))
    with pytest.raises(ValueError, match="tokens_per_step.*TokenCounter"):
        trainer(2).fit(model, ramp_batches([4, 4]))
    assert model.used_lrs == [0.0]  # the one step taken before the error ran at LR 0


def test_global_count_is_one_sum_all_reduce_over_ranks(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, op, group):
        calls.append((op, group))
        tensor.mul_(2)  # the other rank counted the same

    distributed = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_world_size=lambda group=None: 2,
        all_reduce=fake_all_reduce,
        ReduceOp=torch.distributed.ReduceOp,
    )
    monkeypatch.setattr(tokens_module.torch, "distributed", distributed)
    fake_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert tokens_module._global_sum(torch.tensor(21), fake_trainer) == 42
    assert calls == [(torch.distributed.ReduceOp.SUM, None)]

    distributed.get_world_size = lambda group=None: 1
    assert tokens_module._global_sum(21, fake_trainer) == 21
    distributed.is_initialized = lambda: False
    assert tokens_module._global_sum(21, fake_trainer) == 21
    assert len(calls) == 1


# --- batches that train nothing, half-precision masks, dataloader_iter, YAML count_fn, mid-window checkpoints -------


def test_a_half_precision_or_segment_id_mask_counts_its_nonzero_entries_exactly():
    lengths = torch.tensor([4095, 4000, 3000, 4096])
    mask = torch.arange(4096) < lengths[:, None]
    for dtype in (torch.long, torch.bool, torch.float16, torch.bfloat16):  # fp16 sums this to 15192, bf16 to 15168
        assert int(count_tokens({"input_ids": mask, "attention_mask": mask.to(dtype)})) == 15191
    ones = torch.ones(16, 4096, dtype=torch.float16)  # 65536 tokens: beyond fp16's largest finite value, 65504
    assert int(count_tokens({"input_ids": ones, "attention_mask": ones})) == 65536
    segments = torch.tensor([[1, 1, 2, 2, 2, 3, 0, 0]])  # a packing collator's document ids, 0 for padding
    assert int(count_tokens({"input_ids": segments, "attention_mask": segments})) == 6


class ReturnsNoneAt(ScheduledGPT):
    """``training_step`` returns None at the batches ``none_at`` of epoch 0: Lightning skips their backward."""

    def __init__(self, make_scheduler, none_at: set[int]) -> None:
        super().__init__(make_scheduler)
        self.none_at = none_at

    def training_step(self, batch, batch_idx):
        return None if batch_idx in self.none_at else super().training_step(batch, batch_idx)


def assert_lrs_follow_the_trained_tokens(model: ScheduledGPT, counter: TokenCounter, stepped: list[int | None]):
    """``stepped``: the sequences each optimizer step trained, ``None`` for a step that trained nothing."""
    trained = [size for size in stepped if size is not None]
    seen = list(itertools.accumulate(size * CONTEXT for size in trained))
    assert counter.tokens_seen == seen[-1]
    used = [lr for lr, size in zip(model.used_lrs, stepped, strict=True) if size is not None]
    expected = [reference_power(n, size * CONTEXT, 0.02, warmup=40) for n, size in zip(seen, trained)]
    assert used == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("none_at", "accumulate", "stepped"),
    [
        ({1}, 1, [2, None, 5, 7]),  # Lightning still runs the optimizer step (without gradients) and the scheduler
        ({1}, 2, [2, 5 + 7]),  # the micro-batch that closes a window
        ({0}, 2, [3, 5 + 7]),  # the one that opens it
        ({0, 1}, 2, [None, 5 + 7]),  # a whole window: its step trained nothing
    ],
)
def test_a_batch_whose_training_step_returns_none_counts_no_tokens(none_at, accumulate, stepped):
    model, counter = ReturnsNoneAt(power, none_at), TokenCounter()
    fit_trainer = trainer(len(stepped), callbacks=[counter], accumulate_grad_batches=accumulate)
    fit_trainer.fit(model, ramp_batches([2, 3, 5, 7]))
    assert_lrs_follow_the_trained_tokens(model, counter, stepped)
    assert model.scheduler.steps_skipped == stepped.count(None)


def test_under_a_grad_scaler_a_window_whose_last_training_step_returns_none_trains_nothing():
    # Lightning's GradScaler plugins then skip optimizer.step(): the window's earlier micro-batch is lost too
    model, counter = ReturnsNoneAt(power, {1}), TokenCounter()
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit_trainer = trainer(2, callbacks=[counter], accumulate_grad_batches=2, plugins=[scaler])
    fit_trainer.fit(model, ramp_batches([2, 3, 5, 7]))
    assert_lrs_follow_the_trained_tokens(model, counter, [None, 5 + 7])
    assert model.scheduler.steps_skipped == 1


def with_none_batches(sizes: list[int | None]) -> DataLoader:
    """ramp_batches(sizes) with a ``None`` batch where ``sizes`` has ``None``, as a dropping collate_fn yields."""
    batches = iter(ramp_batches([size for size in sizes if size is not None]))
    return DataLoader([None if size is None else next(batches) for size in sizes], batch_size=None)


@pytest.mark.parametrize(
    ("sizes", "accumulate", "stepped"),
    [
        ([2, None, 5, 7], 1, [2, 5, 7]),  # Lightning steps the scheduler at the None batch, not the optimizer
        ([None, 2, 5, 7], 1, [2, 5, 7]),  # before any token is known
        ([2, None, 5, 7], 2, [5 + 7]),  # None closes window 1: no optimizer step; window 2 zeroes its gradients
    ],
)
def test_a_none_batch_neither_counts_tokens_nor_advances_the_schedule(sizes, accumulate, stepped):
    model, counter = ScheduledGPT(power), TokenCounter()
    fit_trainer = trainer(-1, max_epochs=1, callbacks=[counter], accumulate_grad_batches=accumulate)
    fit_trainer.fit(model, with_none_batches(sizes))
    assert fit_trainer.global_step == len(stepped)
    assert_lrs_follow_the_trained_tokens(model, counter, stepped)
    assert model.scheduler.steps_skipped == 1


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_wsd_in_steps_follows_the_optimizer_steps_across_steps_that_train_nothing(accumulate):
    make = lambda opt: WSDScheduler(opt, warmup=8, total=100, decay=0)  # noqa: E731
    model = SkipsRestOfFirstEpoch(make, skip_at=2 * accumulate)  # epoch 0 ends with a -1 after two steps
    fit_trainer = trainer(6, max_epochs=2, callbacks=[TokenCounter()], accumulate_grad_batches=accumulate)
    fit_trainer.fit(model, ramp_batches([4] * 4 * accumulate))
    assert model.used_lrs == pytest.approx([0.02 * (k + 1) / 8 for k in range(6)], rel=1e-12)


def test_a_training_step_that_takes_the_dataloader_iter_is_refused_with_what_to_do():
    class IteratesItself(ScheduledGPT):
        def training_step(self, dataloader_iter):
            batch, _, _ = next(dataloader_iter)
            return self.loss(batch)

    with pytest.raises(ValueError, match=r"dataloader_iter.*callbacks never see.*training_step\(self, batch, "):
        trainer(2, callbacks=[TokenCounter()]).fit(IteratesItself(power), ramp_batches([4, 4]))


def count_whole_sequences(batch) -> int:
    """A count_fn for the YAML test: the sequences of an ``(inputs, targets)`` batch, not their tokens."""
    return batch[0].shape[0]


def test_count_fn_is_given_in_yaml_as_an_import_path(tmp_path):
    from lightning_power.cli import main

    config = tmp_path / "count_fn.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_power.TokenCounter\n"
        "      init_args: {count_fn: tests.test_tokens.count_whole_sequences}\n"
    )
    main(["fit", "--config", str(CONFIGS / "gpt_power.yaml"), "--config", str(config), *tiny_cli_args(max_steps=2)])
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert metrics["tokens/seen"] == [(0, 8), (1, 16)]  # tiny_cli_args: 8 sequences a batch


class SavesAfterBatch(Callback):
    def __init__(self, batch_idx: int, path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def inside_window_warnings(warnings) -> list[str]:
    return [str(w.message) for w in warnings if "inside a gradient accumulation window" in str(w.message)]


def test_a_checkpoint_saved_inside_an_accumulation_window_is_warned_about(tmp_path, recwarn):
    callbacks = [TokenCounter(), SavesAfterBatch(1, tmp_path / "closed.ckpt")]  # batch 1 closes the first window
    trainer(2, callbacks=callbacks, accumulate_grad_batches=2).fit(ScheduledGPT(power), ramp_batches([4] * 4))
    assert not inside_window_warnings(recwarn)

    callbacks = [TokenCounter(), SavesAfterBatch(2, tmp_path / "open.ckpt")]  # batch 2 opens the second one
    trainer(2, callbacks=callbacks, accumulate_grad_batches=2).fit(ScheduledGPT(power), ramp_batches([4] * 4))
    (message,) = inside_window_warnings(recwarn)
    assert "after 1 of its 2 micro-batches" in message and "will not match the uninterrupted run" in message
