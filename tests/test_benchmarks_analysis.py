"""The benchmarks' analysis on synthetic run records (no training): divergence detection, which runs ``--resume``
replays, how an LR sweep grows and refines, and the numbers and verdicts each benchmark reports."""

import argparse
import json
import math

import pytest
import torch


# --------------------------------------------------------------------------------------------------- divergence
class ScriptedLoss(torch.nn.Module):
    """A model whose training loss at step i is ``losses[i]`` (then 2.0); its validation loss is 2.0."""

    def __init__(self, losses):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.losses, self.calls = list(losses), 0

    def loss(self, batch):
        if not self.training:
            return self.weight * 0 + 2.0
        value = self.losses[self.calls] if self.calls < len(self.losses) else 2.0
        self.calls += 1
        return self.weight * 0 + value


def train_scripted(common, losses, steps=10):
    model = ScriptedLoss(losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    corpus = common.Corpus(torch.arange(64, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.long), 4)
    return common.train(
        model, optimizer, scheduler, corpus, batch_size=2, steps=steps, seed=0, device="cpu", grad_clip=1.0,
        curve_points=steps,
    )  # fmt: skip


HIGH = math.log(256) + 1.05  # just above the divergence loss, ln 256 + 1


@pytest.mark.parametrize(
    ("losses", "stopped", "steps_done"),
    [
        ([HIGH, HIGH, HIGH], True, 3),  # three curve points above ln 256 + 1: lost
        ([HIGH, HIGH, 2.0, HIGH, HIGH, 2.0, HIGH], False, 10),  # spikes that recover are not
        ([2.0, math.nan], True, 2),  # a non-finite loss stops at once
        ([2.0, math.inf], True, 2),
        ([], False, 10),
    ],
)
def test_train_stops_a_run_three_curve_points_above_ln256_plus_1_or_not_finite(bench, losses, stopped, steps_done):
    common = bench("common")
    result = train_scripted(common, losses)
    assert (result.stopped_early, result.steps_done, len(result.curve)) == (stopped, steps_done, steps_done)
    assert result.val_loss == pytest.approx(2.0)
    assert (common.final_loss(result.to_dict()) == math.inf) == stopped


def test_train_keeps_a_run_just_below_the_divergence_loss(bench):
    common = bench("common")
    result = train_scripted(common, [math.log(256) + 0.95] * 10)
    assert not result.stopped_early and result.steps_done == 10


# --------------------------------------------------------------------------------------------------- --resume
CONFIG = {"model": "same", "power": {"a": 4.0, "b": -0.5, "batch_exponent": 1.0, "lr_max": 0.02}}


def schedule_record(**changes):
    record = {"schedule": "wsd", "batch_size": 4, "tokens": 4096, "log2_lr": -6.0, "seed": 0, "val_loss": 2.5}
    return record | changes


def save_result(common, path, runs, config=CONFIG, **environment):
    env = common.environment("cpu") | environment
    path.write_text(json.dumps({"config": config, "environment": env, "runs": runs}))
    return path


def replay_of(common, path, config=CONFIG):
    return common.replay_finished(path, config, "cpu", settings=("model",))


def test_resume_replays_only_the_same_schedule_run(bench, tmp_path):
    common = bench("common")
    path = save_result(common, tmp_path / "result.json", [schedule_record()])
    replay = replay_of(common, path)
    job = schedule_record(config=CONFIG)
    assert replay(job) == schedule_record() | {"replayed": True}
    for change in ({"seed": 1}, {"tokens": 8192}, {"batch_size": 8}, {"log2_lr": -5.0}, {"schedule": "cosine"}):
        assert replay(job | change) is None, change
    other_power = CONFIG | {"power": CONFIG["power"] | {"a": 9.0}}  # Power's law is no part of a WSD run
    assert replay(job | {"config": other_power})["replayed"]


def test_resume_counts_a_power_law_without_batch_exponent_as_the_papers_p_1(bench, tmp_path):
    common = bench("common")
    old_law = {"a": 4.0, "b": -0.5, "lr_max": 0.02}  # recorded before Power had a batch exponent
    run = schedule_record(schedule="power", power=old_law)
    path = save_result(common, tmp_path / "result.json", [run], config={"model": "same", "power": old_law})
    replay = replay_of(common, path)
    job = schedule_record(schedule="power", config=CONFIG)
    assert replay(job)["replayed"]
    moved = CONFIG | {"power": CONFIG["power"] | {"batch_exponent": 0.5}}
    assert replay(job | {"config": moved}) is None


def test_resume_refuses_a_result_from_a_machine_with_another_core_count(bench, tmp_path):
    common = bench("common")
    cores = common.environment("cpu")["cpu_count"]
    path = save_result(common, tmp_path / "result.json", [schedule_record()], cpu_count=cores + 1)
    with pytest.raises(SystemExit, match="another machine .cpu_count"):
        replay_of(common, path)


def test_resume_refuses_a_result_run_on_another_device_setting(bench, tmp_path):
    common = bench("common")
    config = {key: 1 for key in common.RUN_SETTINGS} | {"device": "cpu"}
    path = save_result(common, tmp_path / "result.json", [schedule_record()], config=config)
    with pytest.raises(SystemExit, match="other settings.*device"):
        common.replay_finished(path, config | {"device": "cpu:1"}, "cpu")


def test_resume_refuses_a_result_from_another_gpu(bench, tmp_path, monkeypatch):
    common = bench("common")
    here = common.environment("cpu") | {"device": "cuda", "gpu": "NVIDIA H100", "cuda": "12.4"}
    path = save_result(common, tmp_path / "result.json", [schedule_record()], **here | {"gpu": "NVIDIA A100"})
    monkeypatch.setattr(common, "environment", lambda device: here)
    with pytest.raises(SystemExit, match="another machine .gpu: 'NVIDIA A100', now 'NVIDIA H100'"):
        common.replay_finished(path, CONFIG, "cuda", settings=("model",))


def test_mup_transfer_resume_replays_only_the_same_parametrization_width_lr_and_seed(bench, tmp_path):
    common, mup_transfer = bench("common"), bench("mup_transfer")
    run = {"parametrization": "mup", "width": 64, "log2_lr": -6.0, "seed": 0, "val_loss": 2.5}
    path = save_result(common, tmp_path / "result.json", [run])
    replay = common.replay_finished(path, CONFIG, "cpu", run_key=mup_transfer.run_key, settings=("model",))
    assert replay(run | {"config": CONFIG})["replayed"]
    for change in ({"seed": 1}, {"parametrization": "sp"}, {"width": 128}, {"log2_lr": -5.0}):
        assert replay(run | change | {"config": CONFIG}) is None, change


# --------------------------------------------------------------------------------------------------- LR sweep
def finish_grid(sweep, losses, xs):
    follow = []
    for x in xs:
        follow = sweep.record("g", x, 0, losses[x])
    return follow


def test_lr_sweep_extends_past_the_lower_edge(bench):
    sweep = bench("common").LRSweep(seeds=2, refine=3)
    sweep.start("g", [-6, -5, -4])
    losses = {-8: 2.5, -7: 2.0, -6: 2.1, -5: 2.2, -4: 2.3}
    assert finish_grid(sweep, losses, [-4, -5, -6]) == [(-7, 0)]
    assert sweep.record("g", -6, 1, 1.0) == []  # another seed neither grows the grid nor moves seed 0's best
    assert sweep.record("g", -7, 0, losses[-7]) == [(-8, 0)]
    assert sorted(sweep.record("g", -8, 0, losses[-8])) == [(-8, 1), (-7, 1), (-6, 1)]


def test_lr_sweep_extends_at_most_twice_then_refines_at_the_edge(bench):
    sweep = bench("common").LRSweep(seeds=3, refine=3)
    sweep.start("g", [-6, -5, -4])
    losses = {x: 2.0 + 0.1 * (x + 10) for x in range(-10, -3)}  # best ever lower: the optimum is off the grid
    assert finish_grid(sweep, losses, [-6, -5, -4]) == [(-7, 0)]
    assert sweep.record("g", -7, 0, losses[-7]) == [(-8, 0)]
    follow = sweep.record("g", -8, 0, losses[-8])
    assert sorted(follow) == sorted((x, s) for x in (-8, -7, -6) for s in (1, 2))


def test_lr_sweep_gives_no_more_seeds_to_a_diverged_lr(bench):
    sweep = bench("common").LRSweep(seeds=2, refine=3)
    sweep.start("g", [-6, -5, -4])
    follow = finish_grid(sweep, {-6: 2.5, -5: 2.0, -4: math.inf}, [-6, -5, -4])
    assert sorted(follow) == [(-6, 1), (-5, 1)]


# --------------------------------------------------------------------------------------------------- mup_transfer
def mup_runs(optima, quadratic=0.05, level=None, lrs=range(-9, -1), seeds=(0,)):
    """Runs of a parabola in log2 LR per (parametrization, width): ``optima[param][width]`` is its vertex, ``level``
    (default 2.0 - 0.01 log2 width) its minimum; seed s adds 0.02 s."""
    runs = []
    for param, by_width in optima.items():
        for width, best in by_width.items():
            floor = level[param][width] if level else 2.0 - 0.01 * math.log2(width)
            for x in lrs:
                for s in seeds:
                    loss = floor + quadratic * (x - best) ** 2 + 0.02 * s
                    runs.append(
                        {
                            "parametrization": param,
                            "width": width,
                            "log2_lr": float(x),
                            "seed": s,
                            "val_loss": loss,
                            "stopped_early": False,
                        }
                    )
    return runs


def test_mup_transfer_averages_the_seeds_of_each_lr(bench):
    summary = bench("mup_transfer").analyze(mup_runs({"mup": {32: -5.0, 64: -5.0}}, seeds=(0, 1, 2)))
    assert summary["mean_loss"]["mup"][32]["-5.0"] == pytest.approx(2.0 - 0.05 + 0.02)
    assert summary["best_loss"]["mup"][64] == pytest.approx(2.0 - 0.06 + 0.02)


def test_mup_transfer_takes_the_transferred_lr_from_the_narrowest_width(bench):
    summary = bench("mup_transfer").analyze(mup_runs({"mup": {32: -5.0, 64: -5.5, 128: -6.0}}))
    assert summary["drift_log2"]["mup"] == pytest.approx(-1.0, abs=1e-9)
    at_transferred = summary["loss_at_transferred_lr"]["mup"]  # 2^-5, the narrowest width's optimum
    assert at_transferred[128] == pytest.approx(2.0 - 0.07 + 0.05 * 1.0**2)
    assert at_transferred[64] == pytest.approx(2.0 - 0.06 + 0.05 * 0.5**2)


@pytest.mark.parametrize(
    ("floors", "wider_better"),
    [
        ((2.0, 1.9, 1.8), True),
        ((2.0, 1.9, 1.9), False),  # no better: not met
        ((2.0, 1.9, 1.95), False),  # better, then worse again
        ((2.0, 2.1, 1.8), False),
    ],
)
def test_mup_wider_better_at_the_transferred_lr_needs_every_doubling_strictly_better(bench, floors, wider_better):
    widths = (32, 64, 128)
    level = {"mup": dict(zip(widths, floors))}
    summary = bench("mup_transfer").analyze(mup_runs({"mup": dict.fromkeys(widths, -5.0)}, level=level))
    assert summary["wider_better_at_transferred_lr"]["mup"] is wider_better
    assert summary["goals"]["mup_wider_better_at_transferred_lr"]["met"] is wider_better


@pytest.mark.parametrize(("narrow", "wide", "met"), [(-5.0, -5.4, True), (-5.0, -6.0, False), (-5.0, -4.0, False)])
def test_mup_drift_goal_takes_the_size_of_the_drift_either_way(bench, narrow, wide, met):
    summary = bench("mup_transfer").analyze(mup_runs({"mup": {32: narrow, 256: wide}}))
    goal = summary["goals"]["mup_drift_within_0.5"]
    assert goal["drift_log2"] == pytest.approx(wide - narrow, abs=1e-9) and goal["met"] is met


def test_mup_drift_of_exactly_half_a_log2_unit_meets_the_goal(bench):
    summary = {"drift_log2": {"mup": 0.5}, "best_loss": {}, "loss_at_transferred_lr": {}}
    goals = bench("mup_transfer").goals(summary | {"wider_better_at_transferred_lr": {"mup": True}})
    assert goals["mup_drift_within_0.5"] == {"drift_log2": 0.5, "met": True}


@pytest.mark.parametrize(("narrow", "wide", "met"), [(-5.0, -3.0, True), (-5.0, -7.0, True), (-5.0, -5.3, False)])
def test_sp_drift_goal_takes_the_size_of_the_drift_either_way(bench, narrow, wide, met):
    summary = bench("mup_transfer").analyze(mup_runs({"sp": {32: narrow, 256: wide}}))
    assert summary["goals"]["sp_optimum_moves_more_than_0.5"]["met"] is met


def test_mup_quality_goal_judges_muP_at_the_transferred_lr_not_at_its_own_best(bench):
    # muP's optimum moves by 1 log2 unit: at the transferred LR its widest loss is 0.05 worse than at its best
    optima = {"sp": {32: -5.0, 256: -8.0}, "mup": {32: -5.0, 256: -6.0}}
    level = {"sp": {32: 2.1, 256: 2.0}, "mup": {32: 2.1, 256: 2.0}}
    goal = bench("mup_transfer").analyze(mup_runs(optima, level=level))["goals"]["mup_widest_within_1pct_of_sp_best"]
    assert goal["width"] == 256 and goal["sp_best"] == pytest.approx(2.0) and goal["mup_best"] == pytest.approx(2.0)
    assert goal["mup_best_vs_sp_best"] == pytest.approx(0.0, abs=1e-12)
    assert goal["mup_transferred_vs_sp_best"] == pytest.approx(0.025)
    assert not goal["met"]


def test_mup_quality_goal_reports_muP_best_relative_to_sp_best(bench):
    optima = {"sp": {32: -5.0, 256: -8.0}, "mup": {32: -5.0, 256: -5.0}}
    level = {"sp": {32: 2.1, 256: 2.0}, "mup": {32: 2.1, 256: 1.9}}
    goal = bench("mup_transfer").analyze(mup_runs(optima, level=level))["goals"]["mup_widest_within_1pct_of_sp_best"]
    assert goal["mup_best_vs_sp_best"] == pytest.approx(1.9 / 2.0 - 1)
    assert goal["mup_transferred_vs_sp_best"] == pytest.approx(1.9 / 2.0 - 1) and goal["met"]


def test_mup_transfer_leaves_out_a_width_where_every_run_blew_up(bench):
    runs = mup_runs({"sp": {32: -5.0, 64: -6.0, 128: -7.0}})
    runs = [r | {"stopped_early": True} if r["width"] == 128 else r for r in runs]
    summary = bench("mup_transfer").analyze(runs)
    assert set(summary["optimal_log2_lr"]["sp"]) == {32, 64}
    assert summary["drift_log2"]["sp"] == pytest.approx(-1.0, abs=1e-9)


def test_mup_transfer_flags_an_optimum_at_the_grid_edge(bench):
    summary = bench("mup_transfer").analyze(mup_runs({"mup": {32: -5.0, 64: -12.0}}))
    assert summary["optimum_inside_grid"]["mup"] == {32: True, 64: False}
    assert summary["optimal_log2_lr"]["mup"][64] == -9.0  # the best grid point, not the true optimum


# --------------------------------------------------------------------------------------------------- schedule_transfer
ST_CONFIG = {"batch_sizes": [4, 16], "token_budgets": [4096]}


def schedule_runs(batch, wsd=2.0, power=2.0, cosine=2.05, seeds=(0,), spread=0.0):
    """One cell's runs: WSD and cosine around their best LR 2^-6 (+0.1 per log2 unit), Power at one LR; seed s adds
    ``spread * s``."""
    runs = []
    for s in seeds:
        for schedule, best in (("wsd", wsd), ("cosine", cosine)):
            if best is None:
                continue
            for x in (-7.0, -6.0, -5.0):
                loss = best + 0.1 * abs(x + 6) + spread * s
                runs.append(schedule_record(schedule=schedule, batch_size=batch, log2_lr=x, seed=s, val_loss=loss))
        runs.append(
            schedule_record(schedule="power", batch_size=batch, log2_lr=-5.5, seed=s, val_loss=power + spread * s)
        )
    return [r | {"stopped_early": False} for r in runs]


@pytest.mark.parametrize(
    ("power_losses", "worst", "met"),
    [
        ((2.01, 2.0), 0.005, True),
        ((2.01, 2.06), 0.03, False),  # the worst cell decides
        ((1.9, 1.98), -0.01, True),  # Power better than tuned WSD meets the goal
    ],
)
def test_schedule_transfer_goal_is_power_within_1pct_of_best_wsd_in_the_worst_cell(bench, power_losses, worst, met):
    runs = [*schedule_runs(4, power=power_losses[0]), *schedule_runs(16, power=power_losses[1])]
    summary = bench("schedule_transfer").analyze(runs, ST_CONFIG)
    assert summary["power_gap_vs_best_wsd"] == pytest.approx(
        {"batch4_tokens4096": power_losses[0] / 2.0 - 1, "batch16_tokens4096": power_losses[1] / 2.0 - 1}
    )
    goal = summary["goals"]["power_within_1pct_of_best_wsd_in_every_cell"]
    assert goal["worst_gap"] == pytest.approx(worst) and goal["cells"] == 2 and goal["met"] is met


def test_schedule_transfer_goal_is_not_met_while_a_cell_is_missing(bench):
    summary = bench("schedule_transfer").analyze(schedule_runs(4), ST_CONFIG)
    goal = summary["goals"]["power_within_1pct_of_best_wsd_in_every_cell"]
    assert list(summary["cells"]) == ["batch4_tokens4096"] and goal["worst_gap"] == 0.0 and not goal["met"]


def test_schedule_transfer_goal_is_not_met_while_a_cell_lacks_wsd(bench):
    runs = [*schedule_runs(4), *schedule_runs(16, wsd=None)]
    summary = bench("schedule_transfer").analyze(runs, ST_CONFIG)
    assert set(summary["power_gap_vs_best_wsd"]) == {"batch4_tokens4096"}
    assert set(summary["power_gap_vs_best_cosine"]) == {"batch4_tokens4096", "batch16_tokens4096"}
    assert not summary["goals"]["power_within_1pct_of_best_wsd_in_every_cell"]["met"]


def test_schedule_transfer_compares_the_seed_means(bench):
    runs = [*schedule_runs(4, power=2.02, seeds=(0, 1), spread=0.04), *schedule_runs(16, seeds=(0, 1), spread=0.04)]
    summary = bench("schedule_transfer").analyze(runs, ST_CONFIG)
    cell = summary["cells"]["batch4_tokens4096"]
    assert cell["power"]["loss"] == pytest.approx(2.04) and cell["power"]["seeds"] == pytest.approx([2.02, 2.06])
    assert cell["wsd"]["best_loss"] == pytest.approx(2.02) and cell["wsd"]["best_log2_lr"] == -6.0
    assert summary["power_gap_vs_best_wsd"]["batch4_tokens4096"] == pytest.approx(2.04 / 2.02 - 1)


def test_schedule_transfer_fits_the_optimal_lr_of_each_tuned_schedule(bench):
    runs = [*schedule_runs(4), *schedule_runs(16)]
    for r in runs:
        if r["batch_size"] == 4 and r["schedule"] == "wsd":
            r["val_loss"] = {-7.0: 2.1, -6.0: 2.0, -5.0: 2.05}[r["log2_lr"]]
        if r["batch_size"] == 16 and r["schedule"] == "cosine":
            r["val_loss"] = {-7.0: 2.3, -6.0: 2.2, -5.0: 2.1}[r["log2_lr"]]
    cells = bench("schedule_transfer").analyze(runs, ST_CONFIG)["cells"]
    wsd = cells["batch4_tokens4096"]["wsd"]
    assert wsd["optimal_log2_lr"] == pytest.approx(-6 + 1 / 6) and wsd["optimum_inside_grid"]
    assert wsd["best_log2_lr"] == -6.0 and wsd["mean_loss"] == {"-7.0": 2.1, "-6.0": 2.0, "-5.0": 2.05}
    cosine = cells["batch16_tokens4096"]["cosine"]
    assert cosine["optimal_log2_lr"] == -5.0 and not cosine["optimum_inside_grid"]  # best at the edge
    assert cells["batch4_tokens4096"]["power"]["lr_max"] == 2.0**-5.5


def test_schedule_transfer_centres_the_tuning_grid_on_the_fitted_law_not_powers_amplitude(bench):
    schedule_transfer = bench("schedule_transfer")
    law = {"a": 4.0, "b": -0.5, "batch_exponent": 1.0, "lr_max": 1.0}
    alone = schedule_transfer.predicted_log2_lr(law, 4096, 10**6)
    assert alone == pytest.approx(math.log2(4.0 * 10**-3))
    assert schedule_transfer.predicted_log2_lr(law | {"grid_a": 8.0}, 4096, 10**6) == pytest.approx(alone + 1)


def test_schedule_transfer_refuses_a_partial_calibration_unless_allowed(bench, tmp_path):
    schedule_transfer = bench("schedule_transfer")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"fit": {"a": 9.0, "b": -0.5}, "lr_max": 0.05, "complete": False}))
    flags = dict.fromkeys(("a", "b", "batch_exponent", "lr_max"))
    args = argparse.Namespace(calibration=str(calibration), allow_partial_calibration=False, **flags)
    with pytest.raises(SystemExit, match="cut short"):
        schedule_transfer.power_settings(args, tmp_path, "quick")
    calibration.write_text(json.dumps({"fit": {"a": 9.0, "b": -0.5}, "lr_max": 0.05, "complete": True}))
    assert schedule_transfer.power_settings(args, tmp_path, "quick")["a"] == 9.0
    calibration.write_text(json.dumps({"fit": None, "fit_error": "too few interior cells"}))
    with pytest.raises(SystemExit, match="holds no fit: too few interior cells"):
        schedule_transfer.power_settings(args, tmp_path, "quick")


# --------------------------------------------------------------------------------------------------- calibrate_power
LAW = {"a": 6.0, "b": -0.45, "batch_exponent": 0.6, "lr_max": 0.01}


def amplitude_runs(law, ks=(-1.0, -0.5, 0.0, 0.5, 1.0)):
    return [
        {
            "batch_size": 8,
            "tokens": 4096,
            "seed": 0,
            "log2_amplitude": k,
            "power": law | {"a": law["a"] * 2.0**k},
            "val_loss": 2.0 + 0.1 * k**2,
            "stopped_early": False,
        }
        for k in ks
    ]


@pytest.mark.parametrize("key", ["b", "batch_exponent", "lr_max"])
def test_amplitude_search_refuses_runs_of_which_one_searched_around_another_law(bench, key):
    runs = amplitude_runs(LAW)
    runs[2]["power"] = runs[2]["power"] | {key: LAW[key] * 1.5}
    search = bench("calibrate_power").amplitude_search(runs, LAW)
    assert "another law" in search["error"] and search["a"] is None


def wsd_sweep() -> list[dict]:
    """A WSD sweep whose optimal LR follows 4 beta T^-0.5 exactly, with a parabola in log2 LR around it."""
    return [
        {
            "batch_tokens": bt,
            "tokens": t,
            "lr": 2.0**k,
            "loss": 2.0 + 0.05 * (k - math.log2(4.0 * (bt / 4096) * t**-0.5)) ** 2,
        }
        for bt in (512, 1024, 2048)
        for t in (2e5, 4e5, 8e5)
        for k in range(-14, -2)
    ]


def test_calibrate_power_keeps_the_fits_amplitude_when_the_search_ran_around_another_law(bench):
    calibrate_power = bench("calibrate_power")
    summary = calibrate_power.analyze(wsd_sweep(), amplitude_runs(LAW), {"warmup_tokens": 1000})
    assert "another law" in summary["amplitude_search"]["error"]
    assert summary["power"]["a"] == summary["fit"]["a"] and not summary["power"]["amplitude_searched"]
    assert "PowerScheduler" in summary["yaml"]


def test_calibrate_power_counts_a_null_loss_as_diverged(bench):
    calibrate_power = bench("calibrate_power")
    sweep = wsd_sweep()
    clean = calibrate_power.analyze(sweep, [], {"warmup_tokens": 1000})
    blown = [r | {"loss": None} if r["lr"] == 2.0**-3 else r for r in sweep]  # the largest LR blew up everywhere
    summary = calibrate_power.analyze(blown, [], {"warmup_tokens": 1000})
    assert summary["optima"] == clean["optima"] and summary["fit"]["a"] == pytest.approx(clean["fit"]["a"])


def test_resume_prints_a_replayed_run_whose_validation_loss_was_not_finite(bench, tmp_path):
    common = bench("common")
    record = {"schedule": "wsd", "batch_size": 4, "tokens": 4096, "log2_lr": -3.0, "seed": 0}
    record |= {"val_loss": math.inf, "stopped_early": True, "seconds": 1.0}
    path = tmp_path / "result.json"
    common.write_json(path, {"config": {}, "environment": common.environment("cpu"), "runs": [record]})
    replayed = common.replay_finished(path, {}, "cpu", settings=())(record | {"config": {}})
    assert replayed["val_loss"] is None  # JSON has no inf
    assert common.final_loss(replayed) == math.inf
    assert common.run_outcome(replayed) == "loss inf (1.0 s, replayed)"


def test_schedule_transfer_reports_a_cell_where_every_wsd_lr_diverged_as_not_meeting_the_goal(bench):
    cell = {"batch_size": 4, "tokens": 4096, "seed": 0}
    runs = [
        {**cell, "schedule": schedule, "log2_lr": x, "val_loss": 2.0, "stopped_early": schedule == "wsd"}
        for schedule in ("wsd", "cosine")
        for x in (-7.0, -6.0, -5.0)
    ]
    runs.append({**cell, "schedule": "power", "log2_lr": -5.5, "val_loss": 2.0, "stopped_early": False})
    summary = bench("schedule_transfer").analyze(runs, {"batch_sizes": [4], "token_budgets": [4096]})
    wsd = summary["cells"]["batch4_tokens4096"]["wsd"]
    assert wsd["best_loss"] == math.inf and wsd["optimum_inside_grid"] is False
    assert summary["power_gap_vs_best_wsd"] == {}  # no tuned WSD loss to compare Power with
    assert summary["power_gap_vs_best_cosine"] == {"batch4_tokens4096": 0.0}
    assert summary["goals"]["power_within_1pct_of_best_wsd_in_every_cell"]["met"] is False
