"""MuPPlan against the ``mup`` package (shapes, LR / WD groups, init rescale, readout) and hand-computed values."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import mup
import pytest
import torch
from torch import nn

from lightning_power.demo import GPT
from lightning_power.distributed import logical_param_name
from lightning_power.mup import MuPPlan, ReadoutMultiplier, attention_scale, detect_optimizer_family
from lightning_power.mup.readout import readout_multiplier_of
from lightning_power.schedulers import PowerScheduler


class Net(nn.Module):
    """Every muP class, with a non-square hidden matrix so that fan-in and fan-out multipliers differ."""

    def __init__(self, width: int, hidden: int, readout: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, width)
        self.inp = nn.Linear(5, width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.head = readout(width, 7)
        self.gate = nn.Parameter(torch.ones(3))  # no width dimension at all

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids) + self.inp(x))
        h = h + self.proj(torch.relu(self.fc(h)))
        return self.head(h) * self.gate.sum()


BASE, DELTA, MODEL = (8, 16), (16, 24), (32, 64)  # (width, hidden): m_out = 4, m_in = 4 or 64/16 = 4 ...


def meta(width: int, hidden: int, readout: type[nn.Linear] = nn.Linear) -> Net:
    with torch.device("meta"):
        return Net(width, hidden, readout)


def mup_twin(model: Net) -> Net:
    """The same weights in a model whose head is ``mup.MuReadout``, with ``mup.set_base_shapes`` applied."""
    twin = Net(*MODEL, readout=mup.MuReadout)
    twin.load_state_dict(model.state_dict())
    mup.set_base_shapes(twin, meta(*BASE, mup.MuReadout), delta=meta(*DELTA, mup.MuReadout), rescale_params=False)
    return twin


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    return Net(*MODEL)


@pytest.fixture
def plan(model: Net) -> MuPPlan:
    return MuPPlan.from_models(model, meta(*BASE), meta(*DELTA))


def per_param(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    ids = {id(p): name for name, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_plan_classes_and_multipliers_by_hand(plan: MuPPlan) -> None:
    assert plan.readouts == {"head": "head.weight"}
    roles = {name: spec.role for name, spec in plan.params.items()}
    assert roles == {
        "embed.weight": "vector_like",
        "inp.weight": "vector_like",
        "inp.bias": "vector_like",
        "norm.weight": "vector_like",
        "norm.bias": "vector_like",
        "fc.weight": "hidden",
        "fc.bias": "vector_like",
        "proj.weight": "hidden",
        "proj.bias": "vector_like",
        "head.weight": "readout",
        "head.bias": "vector_like",
        "gate": "vector_like",
    }
    fc, proj = plan["fc.weight"], plan["proj.weight"]
    assert fc.base_shape == (16, 8) and (fc.fan_out_mult, fc.fan_in_mult) == (4.0, 4.0)
    assert proj.base_shape == (8, 16) and (proj.fan_out_mult, proj.fan_in_mult) == (4.0, 4.0)
    assert plan["embed.weight"].base_shape == (None, 8) and plan["gate"].base_shape == (None,)
    assert plan["head.weight"].width_mult == 4.0 and plan["head.bias"].n_inf == 0
    # Table 8, Adam: hidden lr / m and wd * m; SGD: one-width tensors lr * m, wd / m
    assert fc.lr_wd_factors("adam") == (0.25, 4.0)
    assert plan["embed.weight"].lr_wd_factors("adam") == (1.0, 1.0)
    assert plan["norm.bias"].lr_wd_factors("sgd") == (4.0, 0.25)
    assert plan["gate"].lr_wd_factors("sgd") == (1.0, 1.0)
    assert plan.role_counts() == {"vector_like": 9, "hidden": 2, "readout": 1}


def test_nonsquare_hidden_sgd_ratio() -> None:
    model = Net(32, 48)  # fc: m_out = 48/16 = 3, m_in = 32/8 = 4
    plan = MuPPlan.from_models(model, meta(*BASE), meta(*DELTA))
    fc = plan["fc.weight"]
    assert (fc.fan_out_mult, fc.fan_in_mult) == (3.0, 4.0)
    assert fc.lr_wd_factors("sgd") == (0.75, 4 / 3)  # lr / (m_in / m_out), wd * (m_in / m_out)
    assert fc.lr_wd_factors("adam") == (0.25, 4.0)  # mup's width_mult is the fan-in's


@pytest.mark.parametrize("model_width", [(32, 64), (32, 48)])
@pytest.mark.parametrize("family", ["adam", "sgd"])
def test_lr_and_weight_decay_equal_mup_optimizers(model_width: tuple[int, int], family: str) -> None:
    torch.manual_seed(0)
    model = Net(*model_width)
    plan = MuPPlan.from_models(model, meta(*BASE), meta(*DELTA))
    twin = Net(*model_width, readout=mup.MuReadout)
    mup.set_base_shapes(twin, meta(*BASE, mup.MuReadout), delta=meta(*DELTA, mup.MuReadout), rescale_params=False)
    lr, wd = 0.0123, 0.0456
    if family == "adam":
        theirs = per_param(mup.MuAdamW(twin.parameters(), lr=lr, weight_decay=wd), twin)
        ours_groups = torch.optim.AdamW(plan.param_groups(model, lr=lr, weight_decay=wd, optimizer="adam"))
        ours_regrouped = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    else:
        theirs = per_param(mup.MuSGD(twin.parameters(), lr=lr, weight_decay=wd), twin)
        ours_groups = torch.optim.SGD(plan.param_groups(model, lr=lr, weight_decay=wd, optimizer="sgd"))
        ours_regrouped = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    assert plan.regroup(ours_regrouped, model)  # family detected from the class
    for ours in (per_param(ours_groups, model), per_param(ours_regrouped, model)):
        assert ours.keys() == theirs.keys()
        for name, (their_lr, their_wd) in theirs.items():
            assert math.isclose(ours[name][0], their_lr, rel_tol=1e-12), name
            assert math.isclose(ours[name][1], their_wd, rel_tol=1e-12), name
    assert len({(g["lr"], g["weight_decay"]) for g in ours_regrouped.param_groups}) > 1  # the test can fail


def test_logits_equal_mureadout(model: Net, plan: MuPPlan) -> None:
    twin = mup_twin(model)
    plan.attach_readouts(model)
    ids, x = torch.randint(0, 11, (4, 6)), torch.randn(4, 6, 5)
    assert torch.equal(model(ids, x), twin(ids, x))
    assert not torch.equal(
        model.head(torch.ones(2, 32)), nn.functional.linear(torch.ones(2, 32), model.head.weight, model.head.bias)
    )


def test_gpt_trains_exactly_like_the_mup_package() -> None:
    """Five AdamW steps of the demo GPT with our plan vs MuReadout + set_base_shapes + MuAdamW: identical losses."""
    args = {"depth": 1, "n_heads": 2, "context_length": 8, "attention_scale": "1/d_head"}
    torch.manual_seed(0)
    ours = GPT(width=32, **args)
    with torch.device("meta"):
        base, delta = GPT(width=8, **args), GPT(width=16, **args)
    theirs = copy.deepcopy(ours)
    theirs.head = mup.MuReadout(32, 256, bias=False)
    theirs.head.weight.data.copy_(ours.head.weight.data)
    for proxy, width in ((base, 8), (delta, 16)):
        proxy.head = mup.MuReadout(width, 256, bias=False, device="meta")
    mup.set_base_shapes(theirs, copy.deepcopy(base), delta=copy.deepcopy(delta), rescale_params=True)
    plan = MuPPlan.from_models(ours, base, delta, readout="head")
    plan.apply_init(ours, "torch_default")  # the rescale set_base_shapes(rescale_params=True) does
    plan.attach_readouts(ours)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.02, weight_decay=0.1)
    plan.regroup(opt_ours, ours)
    opt_theirs = mup.MuAdamW(theirs.parameters(), lr=0.02, weight_decay=0.1)
    tokens = torch.randint(0, 256, (5, 4, 9))
    for batch in tokens:
        losses = []
        for net, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            loss = net.loss((batch[:, :-1], batch[:, 1:]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == losses[1]


def test_apply_init_torch_default_equals_set_base_shapes_rescale(model: Net, plan: MuPPlan) -> None:
    twin = Net(*MODEL, readout=mup.MuReadout)
    twin.load_state_dict(model.state_dict())
    mup.set_base_shapes(twin, meta(*BASE, mup.MuReadout), delta=meta(*DELTA, mup.MuReadout), rescale_params=True)
    before = {name: p.clone() for name, p in model.named_parameters()}
    assert plan.apply_init(model, "torch_default")
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(ours, theirs), name
    assert not torch.equal(model.head.weight, before["head.weight"])  # sqrt(4) = 2x
    assert torch.equal(model.fc.weight, before["fc.weight"])  # hidden weights keep PyTorch's 1/sqrt(fan_in)


def test_apply_init_fixed_std_equals_mup_init(plan: MuPPlan) -> None:
    """Rescaling a width-independent normal(0.02) init equals drawing it with ``mup.init.normal_``."""
    torch.manual_seed(1)
    model = Net(*MODEL)
    twin = mup_twin(model)
    generator_state = torch.get_rng_state()
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    torch.set_rng_state(generator_state)
    for p in twin.parameters():
        mup.init.normal_(p, std=0.02)
    plan.apply_init(model, "fixed_std")
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, msg=name)
    assert math.isclose(model.fc.weight.std().item(), 0.01, rel_tol=0.05)  # 0.02 / sqrt(4)


def test_apply_init_is_idempotent(model: Net, plan: MuPPlan) -> None:
    assert plan.apply_init(model)
    once = copy.deepcopy(model.state_dict())
    assert not plan.apply_init(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, once[name]), name


def test_readout_hook_survives_deepcopy_pickle_and_is_not_stacked(model: Net, plan: MuPPlan) -> None:
    plan.attach_readouts(model)
    plan.attach_readouts(model)  # again: updated, not stacked
    assert sum(isinstance(h, ReadoutMultiplier) for h in model.head._forward_pre_hooks.values()) == 1
    ids, x = torch.randint(0, 11, (2, 3)), torch.randn(2, 3, 5)
    expected = model(ids, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert readout_multiplier_of(clone.head).width_mult == 4.0
        assert torch.equal(clone(ids, x), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(ids, x), expected)


def test_readout_multiplier_reaches_a_graph_compiled_before_it(model: Net, plan: MuPPlan) -> None:
    ids, x = torch.randint(0, 11, (4, 6)), torch.randn(4, 6, 5)
    compiled = torch.compile(model, backend="eager")
    without = compiled(ids, x)  # traced without the hook; dynamo does not guard on module hooks
    plan.attach_readouts(model)
    with_multiplier = compiled(ids, x)
    assert not torch.allclose(with_multiplier, without)
    torch.testing.assert_close(with_multiplier, mup_twin(model)(ids, x), rtol=0, atol=0)


class Tied(nn.Module):
    """A readout tied to the input embedding, as in GPT-2."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.embed(ids))))


def test_a_readout_called_by_keyword_gets_a_clear_error(model: Net, plan: MuPPlan) -> None:
    plan.attach_readouts(model)
    with pytest.raises(TypeError, match=r"call it as head\(x\), not head\(input=x\)"):
        model.head(input=torch.randn(2, MODEL[0]))


def test_attaching_a_plan_with_another_base_updates_the_multiplier(model: Net, plan: MuPPlan) -> None:
    plan.attach_readouts(model)
    coarser = MuPPlan.from_models(model, meta(16, 32))  # base half the model's width: m = 2
    coarser.attach_readouts(model)
    assert sum(isinstance(h, ReadoutMultiplier) for h in model.head._forward_pre_hooks.values()) == 1
    x = torch.randn(2, MODEL[0])
    assert torch.equal(model.head(x), nn.functional.linear(x / 2, model.head.weight, model.head.bias))


def test_tied_readout_keeps_its_init_and_refuses_torch_default() -> None:
    torch.manual_seed(0)
    model = Tied(32)
    with torch.device("meta"):
        base, delta = Tied(8), Tied(16)
    plan = MuPPlan.from_models(model, base, delta, readout="head")
    assert plan.readouts == {"head": "embed.weight"} and plan["embed.weight"].role == "readout"
    tied, hidden = model.embed.weight.detach().clone(), model.fc.weight.detach().clone()
    with pytest.raises(ValueError, match="tied as embed.weight and head.weight.*model_init='fixed_std'"):
        plan.apply_init(model, "torch_default")
    assert torch.equal(model.fc.weight, hidden)  # refused before any change
    plan.apply_init(model, "fixed_std")  # Table 8: input and output weights keep a width-independent init
    assert torch.equal(model.embed.weight, tied) and torch.equal(model.fc.weight, hidden / 2)


def test_embedding_as_readout_is_refused() -> None:
    with torch.device("meta"):
        model, base, delta = Tied(32), Tied(8), Tied(16)
    with pytest.raises(ValueError, match=r"readout='embed' is an Embedding.*nn.Linear output layer tied"):
        MuPPlan.from_models(model, base, delta, readout="embed")


def test_to_dict_round_trip_and_weights_only_load(plan: MuPPlan) -> None:
    state = plan.to_dict()
    buffer = io.BytesIO()
    torch.save({"plan": state}, buffer)
    buffer.seek(0)
    loaded = MuPPlan.from_dict(torch.load(buffer, weights_only=True)["plan"])
    assert loaded == plan and loaded.to_dict() == state
    assert MuPPlan.from_dict(state).differences(plan) == []


def test_from_dict_refuses_another_version_and_a_readout_that_is_not_one(plan: MuPPlan) -> None:
    state = plan.to_dict()
    for version in (2, None):
        with pytest.raises(ValueError, match=f"muP plan version must be 1, got {version}"):
            MuPPlan.from_dict({**state, "version": version})
    with pytest.raises(ValueError, match=r"readouts\['fc'\] = 'fc.weight' is not a parameter of class 'readout'"):
        MuPPlan.from_dict({**state, "readouts": {"fc": "fc.weight"}})
    with pytest.raises(ValueError, match=r"readouts\['head'\] = 'head.kernel' is not a parameter"):
        MuPPlan.from_dict({**state, "readouts": {"head": "head.kernel"}})


def test_from_base_shapes_file_equals_base_and_delta(model: Net, plan: MuPPlan, tmp_path) -> None:
    path = tmp_path / "net.bsh"
    mup.make_base_shapes(meta(*BASE, mup.MuReadout), meta(*DELTA, mup.MuReadout), savefile=str(path))
    assert MuPPlan.from_base_shapes(model, path) == plan


def test_names_differing_by_wrapper_or_lightning_attribute(plan: MuPPlan) -> None:
    class Wrapped(nn.Module):  # a LightningModule-style ``self.model``
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.model = net

    torch.manual_seed(0)
    wrapped = Wrapped(Net(*MODEL))
    other = MuPPlan.from_models(wrapped, meta(*BASE), meta(*DELTA))
    assert other.params == {f"model.{name}": spec for name, spec in plan.params.items()}
    compiled = torch.compile(Net(*MODEL), backend="eager")  # _orig_mod. prefix
    assert MuPPlan.from_models(compiled, meta(*BASE), meta(*DELTA)) == plan


@pytest.mark.parametrize("kind", ["LinearLR", "LambdaLR"])
def test_scheduler_rebase_keeps_each_group_proportional(model: Net, plan: MuPPlan, kind: str) -> None:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1, "lr": 0.01, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": 0.002, "name": "no_decay"},
        ]
    )
    if kind == "LinearLR":  # chainable: scales the current group LR
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)
        schedule = [lambda s: min(1.0, 0.1 + 0.9 * s / 4)] * 2
    else:  # closed form in base_lrs, one lambda per group
        schedule = [lambda s: 1.0 / (s + 1), lambda s: 2.0**-s]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    plan.regroup(optimizer, model, schedulers=[scheduler])
    assert [g["name"] for g in optimizer.param_groups] == [
        "decay/vector_like-readout",
        "decay/hidden",
        "no_decay",  # muP leaves it whole: the user's name stays
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    for step in range(6):
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                original = 0 if p.dim() == 2 and name.endswith("weight") else 1
                factor = plan.spec_for(name).lr_wd_factors("adam")[0]
                expected = (0.01, 0.002)[original] * factor * schedule[original](step)
                assert math.isclose(group["lr"], expected, rel_tol=1e-12), (name, step)
        assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()


def test_an_optimizer_built_from_named_parameters_keeps_each_name_beside_its_parameter(model: Net, plan: MuPPlan):
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    assert "param_names" in optimizer.param_groups[0]
    plan.regroup(optimizer, model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.param_groups) > 1
    for group in optimizer.param_groups:
        assert group["param_names"] == [names[id(p)] for p in group["params"]]
    assert optimizer.state_dict()["param_groups"][1]["param_names"] == optimizer.param_groups[1]["param_names"]


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: PowerScheduler(opt, tokens_per_step=4096, warmup_tokens=4096 * 2),
        # OneCycleLR computes each group's LR from its initial_lr, max_lr and min_lr: those carry muP's factor too
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=6),
    ],
    ids=["power", "one_cycle"],
)
def test_a_scheduler_scales_muP_groups_proportionally(model: Net, plan: MuPPlan, make_scheduler) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = make_scheduler(optimizer)
    plan.regroup(optimizer, model, schedulers=[scheduler])
    plain = torch.optim.AdamW(nn.Linear(1, 1).parameters(), lr=0.02)
    reference = make_scheduler(plain)
    for _ in range(5):
        for opt, sched in ((optimizer, scheduler), (plain, reference)):
            opt.step()
            sched.step()
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], plain.param_groups[0]["lr"] * group["mup_lr_factor"], rel_tol=1e-12)
    assert {g["mup_lr_factor"] for g in optimizer.param_groups} == {1.0, 0.25}


def test_sequential_scheduler_children_are_rebased(model: Net, plan: MuPPlan) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    const = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, const], milestones=[2])
    plan.regroup(optimizer, model, schedulers=[sequential])
    for _ in range(4):
        optimizer.step()
        sequential.step()
    for group in optimizer.param_groups:
        assert math.isclose(group["lr"], 0.1 * group["mup_lr_factor"], rel_tol=1e-12)
    assert sequential._milestones == [2]


def test_param_groups_are_not_scaled_twice(model: Net, plan: MuPPlan) -> None:
    optimizer = torch.optim.AdamW(plan.param_groups(model, lr=0.01))
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert not plan.regroup(optimizer, model)
    assert [g["lr"] for g in optimizer.param_groups] == lrs


def test_plain_groups_next_to_param_groups_are_still_scaled(model: Net, plan: MuPPlan) -> None:
    built = plan.param_groups(model, lr=0.01, weight_decay=0.1)
    hidden = [p for g in built if g["mup_lr_factor"] != 1.0 for p in g["params"]]
    kept = [g for g in built if g["mup_lr_factor"] == 1.0]
    optimizer = torch.optim.AdamW([*kept, {"params": hidden, "lr": 0.01, "weight_decay": 0.1}])
    assert plan.regroup(optimizer, model)
    expected = per_param(torch.optim.AdamW(plan.param_groups(model, lr=0.01, weight_decay=0.1)), model)
    assert per_param(optimizer, model) == expected
    assert expected["fc.weight"] == (0.0025, 0.4)


def test_adagrad_state_from_construction_is_no_step_but_a_step_is(model: Net, plan: MuPPlan) -> None:
    """Adagrad fills its state when built; regrouping must still work then, and must refuse after a step."""
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    assert optimizer.state  # step 0 and the accumulator, before any step
    assert plan.regroup(optimizer, model)
    assert per_param(optimizer, model) == per_param(torch.optim.Adagrad(plan.param_groups(model, lr=0.01)), model)
    stepped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randint(0, 11, (2, 3)), torch.randn(2, 3, 5)).sum().backward()
    stepped.step()  # SGD's momentum buffer has no step count
    with pytest.raises(RuntimeError, match="before its first step"):
        plan.regroup(stepped, model)


def test_param_groups_of_another_family_are_refused(model: Net, plan: MuPPlan) -> None:
    optimizer = torch.optim.SGD(plan.param_groups(model, lr=0.1, optimizer="adam"))
    with pytest.raises(ValueError, match=r"optimizer='adam'\) were given to SGD.*build them with optimizer='sgd'"):
        plan.regroup(optimizer, model)
    optimizer = torch.optim.SGD(plan.param_groups(model, lr=0.1, optimizer="sgd"))
    assert not plan.regroup(optimizer, model)
    assert {g["mup_family"] for g in optimizer.param_groups} == {"sgd"}

    class UnknownToMuP(torch.optim.Optimizer):  # e.g. a third-party optimizer: no family can be detected
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

    with pytest.raises(TypeError, match="optimizer_family"):
        plan.regroup(UnknownToMuP(model.parameters()), model)
    assert not plan.regroup(UnknownToMuP(plan.param_groups(model, lr=0.1, optimizer="adam")), model)  # groups say
    with pytest.raises(TypeError, match=r"RMS\(param\)"):  # but a known misfit stays refused
        plan.regroup(torch.optim.Adafactor(plan.param_groups(model, lr=0.1, optimizer="adam")), model)


@pytest.mark.parametrize("floor", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "SequentialLR"])
def test_scheduler_with_an_absolute_lr_floor_is_refused(model: Net, plan: MuPPlan, floor: str) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    schedulers = torch.optim.lr_scheduler
    if floor == "CosineAnnealingLR":
        scheduler = schedulers.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.001)
    elif floor == "CosineAnnealingWarmRestarts":
        scheduler = schedulers.CosineAnnealingWarmRestarts(optimizer, T_0=4, eta_min=0.001)
    else:
        warm = schedulers.LinearLR(optimizer, start_factor=0.5, total_iters=2)
        cosine = schedulers.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.001)
        scheduler = schedulers.SequentialLR(optimizer, [warm, cosine], milestones=[2])
    with pytest.raises(ValueError, match=r"\(eta_min=0.001\).*ratios break.*min_lr_ratio"):
        plan.regroup(optimizer, model, schedulers=[scheduler])
    assert len(optimizer.param_groups) == 1  # refused before any change


def test_cosine_schedule_to_zero_keeps_each_group_proportional(model: Net, plan: MuPPlan) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    plan.regroup(optimizer, model, schedulers=[scheduler])
    for step in range(1, 4):
        optimizer.step()
        scheduler.step()
        cosine = 0.5 * (1 + math.cos(math.pi * step / 4))
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], 0.01 * group["mup_lr_factor"] * cosine, rel_tol=1e-9)


def test_optimizer_family_detection() -> None:
    params = [nn.Parameter(torch.zeros(1))]
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert detect_optimizer_family(cls(params)) == "adam"
    assert detect_optimizer_family(torch.optim.SGD(params, lr=0.1)) == "sgd"
    with pytest.raises(TypeError, match="optimizer_family='adam'"):
        detect_optimizer_family(torch.optim.LBFGS(params))
    with pytest.raises(TypeError, match=r"RMS\(param\).*m\^-3/2"):  # its steps scale with RMS(param): not Adam's rules
        detect_optimizer_family(torch.optim.Adafactor(params))


def test_attention_scale() -> None:
    assert attention_scale(64) == 1 / 64
    assert math.isclose(attention_scale(32, base_head_dim=32), 1 / math.sqrt(32))  # SP at the base width
    scaled = [attention_scale(d, base_head_dim=32) * d for d in (32, 64, 128)]  # 1/d_head above the base width
    assert scaled == pytest.approx([math.sqrt(32)] * 3, rel=1e-12)
    with pytest.raises(ValueError, match="base_head_dim"):
        attention_scale(16, base_head_dim=32)


# ------------------------------------------------------------------------------------------------ bad input
def test_identical_base_warns_that_mup_reduces_to_sp(model: Net) -> None:
    with pytest.warns(UserWarning, match="reduces to the standard parametrization"):
        plan = MuPPlan.from_models(model, meta(*MODEL))
    assert all(spec.n_inf == 0 for spec in plan.params.values()) and plan.readouts == {}


def test_base_wider_than_model_is_an_error(model: Net) -> None:
    with pytest.raises(ValueError, match=r"wider than the model \(embed.weight dim 1: base 64 > model 32"):
        MuPPlan.from_models(model, meta(64, 128))


def test_parameter_with_three_width_dimensions_is_refused() -> None:
    class Cube(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.cube = nn.Parameter(torch.zeros(width, width, width))
            self.head = nn.Linear(width, 7)

    with torch.device("meta"):
        model, base, delta = Cube(32), Cube(8), Cube(16)
    with pytest.raises(ValueError, match=r"more than 2 width dimensions are not supported by muP: cube \(32, 32, 32\)"):
        MuPPlan.from_models(model, base, delta)


def test_mismatched_names_and_ranks_are_listed(model: Net) -> None:
    class Other(Net):
        def __init__(self, width: int, hidden: int) -> None:
            super().__init__(width, hidden)
            self.extra = nn.Linear(2, 2)

    with torch.device("meta"):
        other = Other(*BASE)
    with pytest.raises(ValueError, match=r"only in base_model: extra.bias, extra.weight"):
        MuPPlan.from_models(model, other)
    ranked = meta(*BASE)
    ranked.gate = nn.Parameter(torch.ones(3, 1, device="meta"))
    with pytest.raises(ValueError, match=r"ranks .* gate: model \(3,\) vs base_model \(3, 1\)"):
        MuPPlan.from_models(model, ranked)


def test_no_readout_is_an_error_saying_how_to_name_it() -> None:
    class NoHead(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(width, width)
            self.out = nn.Parameter(torch.zeros(3, width))  # an output matrix, but no nn.Linear

    with pytest.raises(ValueError, match=r"no readout found.*readout='head'"):
        MuPPlan.from_models(NoHead(16), NoHead(8))
    with pytest.raises(ValueError, match="readout='fc' has weight shape"):
        MuPPlan.from_models(NoHead(16), NoHead(8), readout="fc")


def test_unnamed_width_to_fixed_linear_warns(model: Net) -> None:
    class TwoHeads(Net):
        def __init__(self, width: int, hidden: int) -> None:
            super().__init__(width, hidden)
            self.aux = nn.Linear(width, 2)

    with torch.device("meta"):
        base = TwoHeads(*BASE)
    with pytest.warns(UserWarning, match="not readouts, so their outputs grow with width: aux"):
        MuPPlan.from_models(TwoHeads(*MODEL), base, readout="head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = MuPPlan.from_models(TwoHeads(*MODEL), base, readout=["head", "aux"])
    assert set(both.readouts) == {"head", "aux"}


def test_parameter_missing_from_plan_at_optimizer_time(model: Net, plan: MuPPlan) -> None:
    model.late = nn.Linear(4, 4)  # created after the plan
    with pytest.raises(ValueError, match=r"'late.weight'.* is not in the muP plan"):
        plan.regroup(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        plan.regroup(torch.optim.AdamW([nn.Parameter(torch.ones(2))]), model)


def test_delta_that_misses_a_width_warns(model: Net) -> None:
    with pytest.warns(UserWarning, match=r"delta_model does not vary.*fc.weight dim 0: base 16 model 64"):
        MuPPlan.from_models(model, meta(8, 16), meta(16, 16))


def test_groups_are_named_by_muP_class_uniquely_per_optimizer(model: Net, plan: MuPPlan) -> None:
    """LearningRateMonitor tags the groups by name (``lr-AdamW/hidden``) and refuses two groups of one name."""
    adam = torch.optim.AdamW(model.parameters())
    plan.regroup(adam, model)
    assert [g["name"] for g in adam.param_groups] == ["vector_like-readout", "hidden"]
    sgd = torch.optim.SGD(plan.param_groups(model, lr=0.1, optimizer="sgd"))  # gate and head.bias have no width
    assert [(g["name"], g["mup_lr_factor"]) for g in sgd.param_groups] == [
        ("vector_like-hidden", 1.0),  # gate (the module's own parameter, listed first), fc, proj, head.bias
        ("vector_like-readout", 4.0),
    ]
    params = list(model.parameters())
    two = torch.optim.AdamW([{"params": params[:4]}, {"params": params[4:]}])  # unnamed: pg1, pg2 as Lightning
    plan.regroup(two, model)
    assert [g["name"] for g in two.param_groups] == ["pg1/vector_like", "pg2/vector_like-readout", "pg2/hidden"]
    torch.manual_seed(0)
    wide_mlp = Net(32, 128)  # fc's fan-in grows 4x, proj's 8x: two hidden groups with different LRs
    groups = MuPPlan.from_models(wide_mlp, meta(*BASE), meta(*DELTA)).param_groups(wide_mlp, lr=1.0)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("vector_like-readout", 1.0),
        ("hidden", 0.25),
        ("hidden_2", 0.125),
    ]


class Gated(nn.Module):
    """A user's module with a submodule attribute called ``module`` and a parameter of its own (LayerScale-like)."""

    def __init__(self, module: nn.Module, dim: int) -> None:
        super().__init__()
        self.module = module
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.weight


class GatedNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.block = Gated(nn.Linear(width, width, bias=False), width)
        self.head = nn.Linear(width, 3)


def test_a_submodule_called_module_keeps_its_name_and_a_name_collision_is_refused() -> None:
    assert logical_param_name("module._forward_module._orig_mod.blocks.0._fsdp_wrapped_module.qkv.weight") == (
        "blocks.0.qkv.weight"  # DDP, Lightning, torch.compile, FSDP1
    )
    assert logical_param_name("_forward_module.module.blocks.0._checkpoint_wrapped_module.w") == "blocks.0.w"  # Fabric
    assert logical_param_name("block.module.weight") == "block.module.weight"
    model = GatedNet(64)
    with torch.device("meta"):
        base, delta = GatedNet(16), GatedNet(32)
    plan = MuPPlan.from_models(model, base, delta, readout="head")
    assert (plan["block.module.weight"].role, plan["block.weight"].role) == ("hidden", "vector_like")
    groups = plan.param_groups(model, lr=1.0)
    assert per_param(torch.optim.AdamW(groups), model)["block.module.weight"][0] == 0.25
    plan.apply_init(model)
    assert torch.equal(model.block.weight, torch.ones(64))  # a gate is vector-like: its init stays

    colliding = Gated(nn.Linear(8, 8, bias=False), 8)  # "module.weight" (DDP's prefix at the root) and "weight"
    with pytest.raises(ValueError, match=r"'weight' and 'module.weight' both have the logical name 'weight'"):
        MuPPlan.from_models(colliding, Gated(nn.Linear(4, 4, bias=False), 4))


class SharedHidden(nn.Module):
    """One hidden weight used by two Linear layers, each with its own bias."""

    def __init__(self, width: int, head: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.head = head(width, 3)


def test_torch_default_rescales_the_bias_of_a_layer_sharing_its_weight_like_mup() -> None:
    torch.manual_seed(0)
    ours, theirs = SharedHidden(64), SharedHidden(64, mup.MuReadout)
    theirs.load_state_dict(ours.state_dict())
    with torch.device("meta"):
        MuPPlan.from_models(ours, SharedHidden(16), SharedHidden(32), readout="head").apply_init(ours, "torch_default")
        base, delta = SharedHidden(16, mup.MuReadout), SharedHidden(32, mup.MuReadout)
    mup.set_base_shapes(theirs, base, delta=delta, rescale_params=True)
    for name, param in theirs.named_parameters():
        assert torch.equal(ours.get_parameter(name), param), name
