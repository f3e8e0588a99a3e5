"""PowerScheduler and WSDScheduler: the LR each optimizer step uses, state, resume, branching, Trainer and CLI."""

import importlib
import io
import math
import pickle
from copy import deepcopy

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_power.demo import GPT
from lightning_power.schedulers import PowerScheduler, WSDScheduler
from tests.helpers.jobs import CONFIGS, read_metrics
from tests.helpers.tiny import tiny_cli_args

BATCH, CONTEXT = 4, 8


def sgd(*lrs):
    """An optimizer with one param group per LR."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def used_lrs(optimizer, scheduler, steps):
    """The LRs of every group at each optimizer step, stepping as a training loop does."""
    lrs = []
    for _ in range(steps):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def flat(rows):
    return [x for row in rows for x in row]


def reference_power(n, batch, base_lr, lr_max=0.02, a=4.0, b=-0.5, warmup=0, decay=0, total=None, r=0.0):
    """Eq. 7-8 of arXiv 2408.13359 written out again, with the exponential decay shape, times base_lr / lr_max."""

    def eta(x):
        return lr_max if x == 0 else min(lr_max, batch / 4096 * a * x**b)

    start = math.inf if total is None else total - decay
    if n > start:
        u = min(1.0, (n - start) / decay) if decay else 1.0
        lr = eta(start) * (r + (1 - r) * (math.exp(-u) - math.exp(-1)) / (1 - math.exp(-1)))
    elif n < warmup:
        lr = n / warmup * eta(warmup)
    else:
        lr = eta(n)
    return lr * base_lr / lr_max


def test_power_lr_of_step_k_is_the_schedule_at_k_plus_one_batches_for_every_group():
    tps = 4096 * 64
    # beta = 64, a = 0.05: eta(n) = 3.2 / sqrt(n), below lr_max from the end of warmup on
    settings = dict(a=0.05, b=-0.5, warmup_tokens=3 * tps, decay_tokens=4 * tps, total_tokens=10 * tps)
    optimizer = sgd(0.02, 0.005)
    scheduler = PowerScheduler(optimizer, tokens_per_step=tps, min_lr_ratio=0.1, **settings)
    expected = [
        [
            reference_power((k + 1) * tps, tps, base, a=0.05, warmup=3 * tps, decay=4 * tps, total=10 * tps, r=0.1)
            for base in (0.02, 0.005)
        ]
        for k in range(12)
    ]
    lrs = used_lrs(optimizer, scheduler, 12)
    assert flat(lrs) == pytest.approx(flat(expected), rel=1e-12)
    assert 0 < lrs[0][0] < lrs[1][0] < lrs[2][0] < 0.02  # warmup to the power-law value; the first update is not at 0
    assert lrs[2][0] > lrs[3][0] > lrs[4][0] > lrs[5][0] > lrs[6][0]  # power law, then decay
    assert lrs[11][0] == pytest.approx(lrs[11][1] * 4, rel=1e-12)  # the groups keep their ratio


def test_power_lr_max_defaults_to_the_largest_group_lr():
    tps = 4096
    optimizer = sgd(0.001, 0.004)
    scheduler = PowerScheduler(optimizer, tokens_per_step=tps, a=4.0, b=-0.5)
    assert scheduler.lr_max == 0.004
    # eta(n) = 4 / sqrt(n) binds below 0.004 from n = 1e6 on; step 499 has n = 500 * 4096 = 2.048e6
    lrs = used_lrs(optimizer, scheduler, 500)
    assert lrs[0] == [0.001, 0.004]
    assert lrs[499][1] == pytest.approx(4 / math.sqrt(500 * 4096), rel=1e-12)
    assert lrs[499][0] == pytest.approx(lrs[499][1] / 4, rel=1e-12)


def test_wsd_lr_of_step_k_is_the_factor_at_k_plus_one_steps():
    optimizer = sgd(0.1, 0.4)
    scheduler = WSDScheduler(optimizer, warmup=4, total=12, decay=4, decay_shape="cosine", min_lr_ratio=0.1)
    cosine_tail = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u / 4)) for u in (1, 2, 3, 4)]
    factors = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, *cosine_tail, 0.1, 0.1]
    expected = [[0.1 * f, 0.4 * f] for f in factors]
    assert flat(used_lrs(optimizer, scheduler, 14)) == pytest.approx(flat(expected), rel=1e-12)


def test_power_follows_the_reported_batch_of_each_step():
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer, a=4.0, b=-0.5)
    assert optimizer.param_groups[0]["lr"] == 0.0  # nothing known yet
    batches = [4096, 4096, 8192, 16384, 16384, 2048]
    seen, lrs, expected = 0, [], []
    for batch in batches:
        scheduler.set_step_tokens(batch)
        seen += batch
        lrs.append(optimizer.param_groups[0]["lr"])
        expected.append(reference_power(seen, batch, 0.02))
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-12)
    # later steps are predicted with the last batch until the next report
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_power(seen + 2048, 2048, 0.02), rel=1e-12)


def test_power_without_tokens_fails_at_the_first_step_that_needs_them():
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer)
    optimizer.step()
    with pytest.raises(ValueError, match="tokens_per_step.*TokenCounter"):
        scheduler.step()


def test_wsd_in_tokens_needs_reported_tokens():
    optimizer = sgd(1.0)
    scheduler = WSDScheduler(optimizer, warmup=100, total=1000, decay=100, units="tokens")
    assert optimizer.param_groups[0]["lr"] == 0.0  # nothing known yet
    scheduler.set_step_tokens(25)
    assert optimizer.param_groups[0]["lr"] == 0.25
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5  # predicted: 25 more tokens
    optimizer.step()
    scheduler = WSDScheduler(optimizer, warmup=100, total=1000, decay=100, units="tokens")
    with pytest.raises(ValueError, match="TokenCounter"):
        scheduler.step()


def test_uncount_last_step_counts_the_last_step_as_no_tokens_and_applies_the_lr():
    optimizer = sgd(1.0)
    scheduler = WSDScheduler(optimizer, warmup=100, total=1000, decay=0, units="tokens")
    scheduler.set_step_tokens(10)
    optimizer.step()
    scheduler.step()
    optimizer.step()
    scheduler.step()  # a step that trained nothing
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3)  # predicted: 30 tokens
    scheduler.uncount_last_step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    scheduler.uncount_last_step()  # no step since: nothing more to uncount
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_set_step_tokens_applies_the_lr_and_get_last_lr_reports_it():
    optimizer = sgd(0.02, 0.005)
    scheduler = PowerScheduler(optimizer, a=0.05, b=-0.5)
    scheduler.set_step_tokens(4096 * 64)
    expected = [reference_power(4096 * 64, 4096 * 64, base, a=0.05) for base in (0.02, 0.005)]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(expected, rel=1e-12)
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: PowerScheduler(opt, a=4.0, b=-0.5),
        lambda opt: WSDScheduler(opt, warmup=0, total=10, decay=0, units="tokens"),
    ],
)
@pytest.mark.parametrize("tokens", [0, -8])
def test_set_step_tokens_refuses_a_step_without_tokens(make, tokens):
    scheduler = make(sgd(0.02))
    with pytest.raises(ValueError, match="^tokens must be > 0"):
        scheduler.set_step_tokens(tokens)


@pytest.mark.parametrize(
    "make",
    [lambda opt: PowerScheduler(opt, tokens_per_step=4096), lambda opt: WSDScheduler(opt, warmup=1, total=10, decay=2)],
)
def test_a_tensor_lr_is_refused(make):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.02))
    with pytest.raises(TypeError, match="needs float learning rates, param group 0 has a Tensor lr"):
        make(optimizer)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda opt: PowerScheduler(opt, tokens_per_step=0), "tokens_per_step"),
        (lambda opt: PowerScheduler(opt, b=0.0), "b"),
        (lambda opt: PowerScheduler(opt, a=-4.0), "a"),
        (lambda opt: PowerScheduler(opt, lr_max=-0.1), "lr_max"),
        (lambda opt: PowerScheduler(opt, warmup_tokens=-5), "warmup_tokens"),
        (lambda opt: PowerScheduler(opt, warmup_tokens=8, decay_tokens=4, total_tokens=10), "warmup_tokens \\+"),
        (lambda opt: PowerScheduler(opt, decay_shape="step"), "decay_shape"),
        (lambda opt: PowerScheduler(opt, min_lr_ratio=1.0), "min_lr_ratio"),
        (lambda opt: WSDScheduler(opt, warmup=-1, total=10, decay=2), "warmup"),
        (lambda opt: WSDScheduler(opt, warmup=5, total=10, decay=6), "warmup \\+ decay"),
        (lambda opt: WSDScheduler(opt, warmup=1, total=10, decay=2, units="epochs"), "units"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        make(sgd(0.02))


def test_a_zero_optimizer_lr_is_named_not_the_lr_max_it_defaults():
    with pytest.raises(ValueError, match="the optimizer's LR must be > 0, got 0.0"):
        PowerScheduler(sgd(0.0), tokens_per_step=4096)


def test_an_explicit_lr_max_still_needs_a_positive_optimizer_lr():
    with pytest.raises(ValueError, match="the optimizer's LR must be > 0, got 0.0"):
        PowerScheduler(sgd(0.0), tokens_per_step=4096, lr_max=0.01)


def test_power_counts_beta_in_sequences_of_the_reference_length():
    optimizer = sgd(0.02)
    PowerScheduler(optimizer, tokens_per_step=2048 * 64, a=0.05, b=-0.5, reference_sequence_length=2048)
    # 64 sequences of 2048 tokens: beta = 64, as for 64 sequences of 4096 at the default reference
    expected = 64 * 0.05 * (2048 * 64) ** -0.5
    assert expected < 0.02
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("optimizer_lr", [0.003, 0.02, 0.1])
def test_an_explicit_lr_max_caps_the_largest_group_whatever_the_optimizer_lr(optimizer_lr):
    """The largest group follows min(lr_max, beta a n^b); the other groups keep their ratio to it."""
    tps = 4096 * 1024  # beta = 1024: the cap binds early on, the law later
    optimizer = sgd(optimizer_lr, optimizer_lr / 4)
    scheduler = PowerScheduler(optimizer, tokens_per_step=tps, a=4.0, b=-0.5, lr_max=0.01)
    for k in (0, 10, 100_000):
        scheduler.last_epoch = k
        scheduler._apply_lr()
        expected = reference_power((k + 1) * tps, tps, 0.01, lr_max=0.01)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected, expected / 4], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] < 0.01  # at k = 100000 the law is below the cap


def test_muP_groups_built_before_the_scheduler_follow_the_law_times_their_factor():
    """With muP SGD, vector-like groups get lr * width_mult > lr: the reference is still the optimizer's lr."""
    from torch import nn

    from lightning_power.mup import MuPPlan

    def mlp(width):
        return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))

    with torch.device("meta"):
        base, delta = mlp(8), mlp(16)
    model = mlp(32)
    groups = MuPPlan.from_models(model, base, delta).param_groups(model, lr=0.01, optimizer="sgd")
    optimizer = torch.optim.SGD(groups, lr=0.01)
    assert {g["mup_lr_factor"] for g in groups} == {4.0, 1.0}  # width_mult 4: the largest initial LR is 0.04
    tps = 4096 * 1024
    PowerScheduler(optimizer, tokens_per_step=tps, a=0.004, b=-0.5)
    eta = reference_power(tps, tps, 0.01, lr_max=0.01, a=0.004)
    assert eta < 0.01  # the law, below the cap: the reference LR divides it
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(eta * group["mup_lr_factor"], rel=1e-12)


def test_a_scheduler_built_on_a_restored_optimizer_takes_its_reference_from_the_initial_lr():
    settings = dict(tokens_per_step=4096, a=0.01, b=-0.5)  # 0.01 / sqrt(n): below lr_max = 0.02 from step 0
    optimizer = sgd(0.02, 0.005)
    scheduler = PowerScheduler(optimizer, **settings)
    used_lrs(optimizer, scheduler, 3)
    restored = sgd(0.02, 0.005)
    restored.load_state_dict(optimizer.state_dict())  # its groups' lr: the LR of step 3, far below initial_lr
    resumed = PowerScheduler(restored, **settings)
    resumed.load_state_dict(scheduler.state_dict())
    assert used_lrs(restored, resumed, 4) == used_lrs(optimizer, scheduler, 4)


def test_lr_max_inf_follows_the_uncapped_law():
    tps = 4096
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer, tokens_per_step=tps, a=4.0, b=-0.5, lr_max=math.inf)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4.0 * tps**-0.5, rel=1e-12)  # 0.0625 > 0.02
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4.0 * (2 * tps) ** -0.5, rel=1e-12)


def test_per_group_state_is_only_base_lrs():
    """The muP callback may split groups after construction and rescale ``base_lrs``: LR_i = base_lrs[i] * factor."""
    optimizer = sgd(0.02)
    scheduler = WSDScheduler(optimizer, warmup=2, total=10, decay=2)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.02})
    scheduler.base_lrs = [0.02, 0.02 * 0.25]
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.005]
    per_group = {k: v for k, v in vars(scheduler).items() if isinstance(v, list)}
    assert set(per_group) == {"base_lrs", "_last_lr"}


def test_state_dict_is_plain_and_survives_weights_only_load():
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer, tokens_per_step=4096, warmup_tokens=8192, total_tokens=10**6)
    used_lrs(optimizer, scheduler, 3)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["last_epoch"] == 3 and state["tokens_counted"] == 0 and state["batch_tokens"] == 4096

    fresh_optimizer = sgd(0.02)
    fresh = PowerScheduler(fresh_optimizer, tokens_per_step=4096, warmup_tokens=8192, total_tokens=10**6)
    fresh.load_state_dict(state)
    assert used_lrs(fresh_optimizer, fresh, 5) == used_lrs(optimizer, scheduler, 5)  # bit for bit


def test_resume_with_new_decay_settings_branches_a_decay():
    optimizer = sgd(1.0)
    scheduler = WSDScheduler(optimizer, warmup=2, total=100, decay=10, decay_shape="linear")
    before = used_lrs(optimizer, scheduler, 6)
    state = scheduler.state_dict()

    optimizer = sgd(1.0)
    branched = WSDScheduler(optimizer, warmup=2, total=10, decay=4, decay_shape="linear")  # decay from step 6 on
    branched.load_state_dict(state)
    after = used_lrs(optimizer, branched, 5)
    assert flat(before) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert flat(after) == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0])
    assert branched.total == 10 and branched.decay == 4  # the checkpoint did not restore the old settings


def test_resume_with_a_new_batch_keeps_the_tokens_already_seen():
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer, tokens_per_step=4096, a=0.01, b=-0.5)
    used_lrs(optimizer, scheduler, 3)
    optimizer = sgd(0.02)
    resumed = PowerScheduler(optimizer, tokens_per_step=16384, a=0.01, b=-0.5)
    resumed.load_state_dict(scheduler.state_dict())
    expected = [[reference_power(3 * 4096 + (k + 1) * 16384, 16384, 0.02, a=0.01)] for k in range(4)]
    assert max(flat(expected)) < 0.02  # the law, below the cap: n and beta both show
    assert flat(used_lrs(optimizer, resumed, 4)) == pytest.approx(flat(expected), rel=1e-12)


def test_loading_another_schedulers_state_names_the_missing_counters():
    optimizer = sgd(0.02)
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler = PowerScheduler(sgd(0.02), tokens_per_step=4096)
    with pytest.raises(KeyError, match=r"PowerScheduler state_dict lacks \['tokens_counted', 'steps_counted', "):
        scheduler.load_state_dict(other.state_dict())


def test_uncount_last_step_also_takes_the_step_back_from_a_schedule_in_steps():
    optimizer = sgd(1.0)
    scheduler = WSDScheduler(optimizer, warmup=4, total=100, decay=0)
    assert flat(used_lrs(optimizer, scheduler, 2)) == [0.25, 0.5]
    scheduler.step()  # a scheduler step at a batch that trained nothing
    scheduler.uncount_last_step()
    assert scheduler.steps_skipped == 1
    assert flat(used_lrs(optimizer, scheduler, 3)) == [0.75, 1.0, 1.0]  # the 3rd optimizer step runs at t = 3

    state = scheduler.state_dict()
    assert state["steps_skipped"] == 1
    restored = WSDScheduler(sgd(1.0), warmup=8, total=100, decay=0)
    restored.load_state_dict(state)
    assert restored.get_last_lr() == [6 / 8]  # step 7 of the state is the 6th optimizer step
    del state["steps_skipped"]  # a checkpoint of an earlier version: no step was uncounted
    restored.load_state_dict(state)
    assert restored.get_last_lr() == [7 / 8]


def test_the_state_dict_and_copies_leave_the_optimizer_hook_out_and_copies_keep_checking():
    optimizer = sgd(0.02)
    scheduler = PowerScheduler(optimizer, tokens_per_step=4096)
    used_lrs(optimizer, scheduler, 2)
    assert not [key for key in scheduler.state_dict() if key in ("_step_hook", "fed_by_counter")]
    copies = [pickle.loads(pickle.dumps(scheduler)), deepcopy(scheduler)]
    expected = used_lrs(optimizer, scheduler, 2)
    for copy in copies:
        assert used_lrs(copy.optimizer, copy, 2) == expected
        copy.optimizer.step()
        with pytest.raises(ValueError, match="stepped once per optimizer step"):
            copy.optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: PowerScheduler(opt, tokens_per_step=4096),
        lambda opt: WSDScheduler(opt, warmup=0, total=10**6, decay=0, units="tokens"),
    ],
)
def test_a_token_schedule_left_unstepped_between_optimizer_steps_raises(make):
    optimizer = sgd(0.02)
    scheduler = make(optimizer)
    scheduler.set_step_tokens(4096)
    used_lrs(optimizer, scheduler, 3)
    optimizer.step()
    with pytest.raises(
        ValueError,
        match="^(Power|WSD)Scheduler must be stepped once per optimizer step: .*"
        "interval='step' and frequency=1.* 2 optimizer steps ran at the same LR",
    ):
        optimizer.step()


def test_a_schedule_in_steps_left_unstepped_warns_once():
    optimizer = sgd(0.02)
    scheduler = WSDScheduler(optimizer, warmup=0, total=10, decay=0)  # noqa: F841  # a hook does not keep it alive
    with pytest.warns(UserWarning, match="stepped once per optimizer step.*counts its own steps") as record:
        for _ in range(4):
            optimizer.step()
    assert len([w for w in record if "stepped once per optimizer step" in str(w.message)]) == 1


def test_steps_the_optimizer_skips_or_another_scheduler_drives_are_no_missed_scheduler_steps(recwarn):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.02)
    scheduler = PowerScheduler(optimizer, tokens_per_step=4096)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):  # an inf gradient: the scaler skips optimizer.step(), the scheduler still steps
        optimizer.zero_grad()
        scaler.scale((parameter * math.inf).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    assert parameter.item() == 0.0 and scheduler.last_epoch == 3

    optimizer = sgd(0.02)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    power = PowerScheduler(optimizer, tokens_per_step=4096)  # at its cap, 0.02, from step 0
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, power], milestones=[5])
    # Power sits idle for the first 5 steps, the last 3 of them at its own LR, 0.02
    assert flat(used_lrs(optimizer, sequential, 8)) == pytest.approx([0.01, 0.015] + [0.02] * 6)
    # and the hand-off the other way: a WSD, then a LinearLR whose first LR equals the WSD's last one
    optimizer = sgd(0.02)
    wsd = WSDScheduler(optimizer, warmup=0, total=10**6, decay=1)
    cooldown = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=4)
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, [wsd, cooldown], milestones=[3])
    assert flat(used_lrs(optimizer, sequential, 7)) == pytest.approx([0.02] * 4 + [0.015, 0.01, 0.005])
    assert not [w for w in recwarn if "stepped once per optimizer step" in str(w.message)]


def test_branching_a_decay_that_starts_behind_the_checkpoint_warns_of_the_jump(recwarn):
    optimizer = sgd(1.0)
    scheduler = WSDScheduler(optimizer, warmup=10, total=1000, decay=100)
    used_lrs(optimizer, scheduler, 400)
    WSDScheduler(sgd(1.0), warmup=10, total=1000, decay=100).load_state_dict(scheduler.state_dict())  # same schedule
    WSDScheduler(sgd(1.0), warmup=10, total=600, decay=200).load_state_dict(scheduler.state_dict())  # decay from 400
    assert not recwarn.list
    with pytest.warns(
        UserWarning,
        match=r"resumed at 400 steps \(its decay was to start at 900\) with settings whose decay starts earlier, at "
        r"300: the LR jumps .*LR 1, now 0.4",
    ):
        WSDScheduler(sgd(1.0), warmup=10, total=600, decay=300).load_state_dict(scheduler.state_dict())
    # A checkpoint inside its own decay: other floors, shapes or a moved decay are the user's change to that decay
    used_lrs(optimizer, scheduler, 550)  # step 950, in the decay that started at 900
    recwarn.clear()
    for changed in ({"min_lr_ratio": 0.1}, {"decay_shape": "linear"}, {"total": 1200, "decay": 400}):
        WSDScheduler(sgd(1.0), **({"warmup": 10, "total": 1000, "decay": 100} | changed)).load_state_dict(
            scheduler.state_dict()
        )
    assert not recwarn.list

    tps = 4096
    optimizer = sgd(0.02)
    power = PowerScheduler(optimizer, tokens_per_step=tps)
    used_lrs(optimizer, power, 10)
    with pytest.warns(UserWarning, match=rf"resumed at {10 * tps} tokens \(no decay\) .* earlier, at {8 * tps}:"):
        PowerScheduler(sgd(0.02), tokens_per_step=tps, total_tokens=16 * tps, decay_tokens=8 * tps).load_state_dict(
            power.state_dict()
        )
    decaying = PowerScheduler(optimizer := sgd(0.02), tokens_per_step=tps, total_tokens=16 * tps, decay_tokens=8 * tps)
    used_lrs(optimizer, decaying, 10)
    recwarn.clear()  # a new lr_max (here from a new optimizer LR) inside the decay moves no decay start
    PowerScheduler(sgd(0.01), tokens_per_step=tps, total_tokens=16 * tps, decay_tokens=8 * tps).load_state_dict(
        decaying.state_dict()
    )
    assert not recwarn.list


# --- Lightning -------------------------------------------------------------------------------------------------------


class ScheduledGPT(GPT):
    """The demo GPT with ``make_scheduler(optimizer)`` stepped per optimizer step; records the LR each step uses."""

    def __init__(self, make_scheduler) -> None:
        super().__init__(width=16, depth=1, n_heads=2, context_length=CONTEXT)
        self.hparams.pop("make_scheduler", None)  # a test function, not a hyperparameter to checkpoint
        self.make_scheduler = make_scheduler
        self.used_lrs = []

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.02)
        self.scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.used_lrs.append(optimizer.param_groups[0]["lr"])


def byte_batches(batches: int) -> DataLoader:
    data = torch.randint(0, 256, (batches * BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=BATCH)


def fit(model, max_steps, batches=6, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs = {"enable_checkpointing": False, **trainer_kwargs}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, byte_batches(batches), ckpt_path=ckpt_path)
    return trainer


def test_one_scheduler_step_per_optimizer_step_under_gradient_accumulation():
    tps = 2 * BATCH * CONTEXT  # two micro-batches per optimizer step
    model = ScheduledGPT(lambda opt: PowerScheduler(opt, tokens_per_step=tps, a=4.0, b=-0.5, lr_max=0.02))
    fit(model, max_steps=4, accumulate_grad_batches=2)
    assert model.scheduler.last_epoch == 4
    assert model.used_lrs == pytest.approx([reference_power((k + 1) * tps, tps, 0.02) for k in range(4)], rel=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: PowerScheduler(opt, tokens_per_step=BATCH * CONTEXT),
        lambda opt: WSDScheduler(opt, warmup=0, total=10**6, decay=0, units="tokens"),
    ],
)
def test_a_token_schedule_stepped_per_epoch_fails_at_the_second_optimizer_step(make):
    model = ScheduledGPT(make)
    model.configure_optimizers = lambda: ([model.scheduler.optimizer], [model.scheduler])  # Lightning: per epoch
    model.scheduler = make(torch.optim.AdamW(model.parameters(), lr=0.02))
    with pytest.raises(ValueError, match="must be stepped once per optimizer step: configure it with interval='step'"):
        fit(model, max_steps=4)
    assert len(model.used_lrs) == 2


def test_a_schedule_in_steps_stepped_per_epoch_is_warned_about_once():
    model = ScheduledGPT(lambda opt: WSDScheduler(opt, warmup=2, total=10, decay=2))
    model.scheduler = WSDScheduler(torch.optim.AdamW(model.parameters(), lr=0.02), warmup=2, total=10, decay=2)
    model.configure_optimizers = lambda: ([model.scheduler.optimizer], [model.scheduler])
    with pytest.warns(UserWarning, match="WSDScheduler must be stepped once per optimizer step") as record:
        fit(model, max_steps=8, batches=4)  # 2 epochs of 4 steps: the LR of epoch k is the factor at t = k + 1
    assert len([w for w in record if "stepped once per optimizer step" in str(w.message)]) == 1
    assert model.used_lrs == pytest.approx([0.01] * 4 + [0.02] * 4)


def test_trainer_resume_with_a_new_total_branches_the_decay(tmp_path):
    def wsd(total):
        return lambda opt: WSDScheduler(opt, warmup=2, total=total, decay=3, decay_shape="linear")

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = ScheduledGPT(wsd(total=100))
    fit(first, max_steps=3, batches=3, callbacks=[checkpoint], enable_checkpointing=True)
    resumed = ScheduledGPT(wsd(total=7))  # decay over steps 4..6, i.e. t = 5, 6, 7
    fit(resumed, max_steps=7, batches=3, ckpt_path=tmp_path / "step=3.ckpt")
    assert first.used_lrs == pytest.approx([0.01, 0.02, 0.02])
    assert resumed.used_lrs == pytest.approx([0.02, 0.02 * 2 / 3, 0.02 / 3, 0.0])


def test_cli_fit_from_the_power_yaml_logs_the_power_schedule(tmp_path):
    from lightning_power.cli import main

    tps = 8 * 16  # tiny_cli_args: batch 8, context 16; TokenCounter measures it
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "gpt_power.yaml"),
            *tiny_cli_args(max_steps=4),
            "--lr_scheduler.init_args.warmup_tokens=256",
            "--lr_scheduler.init_args.decay_tokens=128",
            "--lr_scheduler.init_args.total_tokens=512",
            "--lr_scheduler.init_args.a=0.05",
        ]
    )
    metrics = read_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    lr_max = 0.003  # the YAML optimizer LR, so lr_max by default
    expected = [
        reference_power((k + 1) * tps, tps, lr_max, lr_max=lr_max, a=0.05, b=-0.51, warmup=256, decay=128, total=512)
        for k in range(4)
    ]
    assert [step for step, _ in metrics["lr-AdamW"]] == [0, 1, 2, 3]
    assert [lr for _, lr in metrics["lr-AdamW"]] == pytest.approx(expected, rel=1e-6)
    assert metrics["tokens/seen"] == [(k, (k + 1) * tps) for k in range(4)]


@pytest.mark.parametrize(("config", "scheduler"), [("gpt_power.yaml", PowerScheduler), ("gpt_wsd.yaml", WSDScheduler)])
def test_the_example_configs_parse(config, scheduler, capsys):
    from lightning_power.cli import main
    from lightning_power.tokens import TokenCounter

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)

    def resolve(class_path: str) -> type:  # the module path, or a shorter public one (jsonargparse 4.39 prints that)
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    assert resolve(printed["lr_scheduler"]["class_path"]) is scheduler
    assert TokenCounter in [resolve(callback["class_path"]) for callback in printed["trainer"]["callbacks"]]
