"""The benchmarks run end to end on a tiny grid and write valid JSON with the documented keys; their sweep and analysis
logic gives known answers on synthetic losses."""

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

from tests.test_benchmarks_analysis import wsd_sweep

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = [
    "--quick",
    "--device",
    "cpu",
    "--workers",
    "1",
    "--context-length",
    "16",
    "--depth",
    "1",
    "--val-windows",
    "8",
    "--base-width",
    "16",
]


def load(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


def test_mup_transfer_smoke(bench, tmp_path):
    mup_transfer = bench("mup_transfer")
    argv = [
        *TINY,
        "--widths",
        "16",
        "32",
        "--log2-lrs",
        "-7",
        "-5",
        "-3",
        "--seeds",
        "2",
        "--refine",
        "1",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert mup_transfer.main(argv) == 0
    result = load(tmp_path / "mup_transfer_quick.json")
    assert result["complete"] and (tmp_path / "mup_transfer_quick.png").stat().st_size > 0
    for param in ("sp", "mup"):
        assert set(result["optimal_log2_lr"][param]) == {"16", "32"}
        assert math.isfinite(result["drift_log2"][param])
        assert set(result["best_loss"][param]) == {"16", "32"}
    assert {"torch", "lightning", "python", "device", "date_utc", "command"} <= set(result["environment"])
    assert result["config"]["overrides"]["widths"] == [16, 32]
    seeds = {(r["parametrization"], r["width"], r["seed"]) for r in result["runs"]}
    assert ("mup", 32, 1) in seeds  # the refinement seed ran
    # --resume replays every run; a wider grid trains only its new width
    assert mup_transfer.main([*argv, "--resume"]) == 0
    again = load(tmp_path / "mup_transfer_quick.json")
    assert len(again["runs"]) == len(result["runs"]) and all(r["replayed"] for r in again["runs"])
    assert again["optimal_log2_lr"] == result["optimal_log2_lr"]
    widths_at = argv.index("--widths")
    wider = [*argv[: widths_at + 3], "48", *argv[widths_at + 3 :], "--resume"]
    assert mup_transfer.main(wider) == 0
    trained = {r["width"] for r in load(tmp_path / "mup_transfer_quick.json")["runs"] if not r.get("replayed")}
    assert trained == {48}
    with pytest.raises(SystemExit, match="other settings.*steps"):
        mup_transfer.main([*argv, "--resume", "--steps", "8"])


def test_calibrate_power_smoke(bench, tmp_path):
    calibrate_power = bench("calibrate_power")
    argv = [
        *TINY,
        "--width",
        "32",
        "--batch-sizes",
        "2",
        "4",
        "--token-budgets",
        "256",
        "512",
        "--log2-lrs",
        "-7",
        "-5",
        "-3",
        "--seeds",
        "1",
        "--warmup-tokens",
        "64",
        "--amplitude-cell",
        "4",
        "512",
        "--log2-amplitudes",
        "-0.5",
        "0",
        "0.5",
        "--out",
        str(tmp_path),
    ]
    calibrate_power.main(argv)  # a 4-cell toy sweep may leave too few interior optima to fit: both are reported
    result = load(tmp_path / "calibrate_power_quick.json")
    assert result["complete"] and len(result["optima"]) == 4
    assert all({"batch_tokens", "tokens", "lr", "loss", "seed"} <= set(r) for r in result["runs"])
    if result["fit"] is None:
        assert "interior cells" in result["fit_error"]
    else:
        assert {"a", "b", "a_stderr", "b_stderr"} <= set(result["fit"]) and "PowerScheduler" in result["yaml"]
    if result["yaml"]:  # a law with b < 0: Power searched its amplitude in the given cell
        search = result["amplitude_search"]
        assert search["cell"] == [4, 512] and result["power"]["a"] == search["a"]
        assert {r["log2_amplitude"] for r in result["amplitude_runs"]} >= {-0.5, 0.0, 0.5}
    # --analyze refits the saved runs without training and rewrites the same files, every result key anew
    (tmp_path / "calibrate_power_quick.png").unlink()
    saved = tmp_path / "calibrate_power_quick.json"
    saved.write_text(json.dumps(result | {"lr_max": 123.0, "law": "stale"}))
    calibrate_power.main(["--analyze", str(saved)])
    again = load(saved)
    assert again["runs"] == result["runs"] and again["optima"] == result["optima"]
    assert {key: again[key] for key in calibrate_power.SUMMARY_KEYS} == {
        key: result[key] for key in calibrate_power.SUMMARY_KEYS
    }
    assert (tmp_path / "calibrate_power_quick.png").stat().st_size > 0
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "schedule_transfer", "config": {}, "runs": []}))
    with pytest.raises(SystemExit, match="not a calibrate_power.py result"):
        calibrate_power.main(["--analyze", str(tmp_path / "other.json")])


@pytest.mark.parametrize(("true_p", "law"), [(1.0, "paper (p = 1)"), (0.5, "fitted batch exponent")])
def test_calibrate_power_keeps_the_paper_law_unless_the_sweep_rejects_it(bench, true_p, law):
    calibrate_power = bench("calibrate_power")
    # each cell's optimum is off the law by +-0.1 log2, in a pattern orthogonal to (1, ln beta, ln T): the fit
    # recovers p and b exactly and still has residuals, so its standard errors are real
    scatter = (1, -1, -1, 1)
    runs = []
    for i, batch in enumerate((512, 1024, 2048, 4096)):
        for j, tokens in enumerate((2e5, 4e5, 8e5, 1.6e6)):
            optimum = math.log2(4.0 * (batch / 4096) ** true_p * tokens**-0.5) + 0.1 * scatter[i] * scatter[j]
            for k in range(-14, -2):
                loss = 2.0 + 0.05 * (k - optimum) ** 2
                runs.append({"batch_tokens": batch, "tokens": tokens, "lr": 2.0**k, "loss": loss})
    summary = calibrate_power.analyze(runs, [], {"warmup_tokens": 1000})
    assert summary["law"] == law
    assert summary["fit"]["batch_exponent"] == pytest.approx(true_p, abs=1e-9)
    assert summary["fit"]["b"] == pytest.approx(-0.5, abs=1e-9)
    free = summary["fit_free_batch_exponent"]
    assert free["batch_exponent"] == pytest.approx(true_p, abs=1e-9) and free["batch_exponent_stderr"] > 0.01
    assert summary["fit_paper"]["batch_exponent"] == 1.0
    assert ("batch_exponent:" in summary["yaml"]) == (true_p != 1.0)
    assert summary["amplitude_search"] is None  # no Power runs: the scheduler keeps the fit's a
    assert summary["power"]["a"] == summary["fit"]["a"] and not summary["power"]["amplitude_searched"]


def power_record(law: dict, k: float, seed: int, loss: float) -> dict:
    """A finished Power run of the amplitude search, as ``calibrate_power.py`` records it."""
    power = law | {"a": law["a"] * 2.0**k}
    return {
        "batch_size": 8,
        "tokens": 4096,
        "seed": seed,
        "log2_amplitude": k,
        "power": power,
        "val_loss": loss,
        "stopped_early": False,
    }


def test_amplitude_search_finds_the_best_multiplier_of_synthetic_losses(bench):
    calibrate_power = bench("calibrate_power")
    law = {"a": 6.0, "b": -0.45, "batch_exponent": 0.6, "lr_max": 0.01}
    runs = [
        power_record(law, k, s, 2.0 + 0.1 * (k + 0.5) ** 2 + 0.01 * s) for k in (-1.5, -1, -0.5, 0, 0.5) for s in (0, 1)
    ]
    search = calibrate_power.amplitude_search(runs, law)
    assert search["error"] is None and search["interior"] and search["cell"] == [8, 4096]
    assert search["log2_multiplier"] == pytest.approx(-0.5, abs=1e-9)
    assert search["a"] == pytest.approx(6.0 * 2**-0.5, rel=1e-9) and search["seeds"]["-0.5"] == 2
    assert search["mean_loss"]["0"] == pytest.approx(2.0 + 0.1 * 0.25 + 0.005)
    moved = calibrate_power.amplitude_search(runs, law | {"b": -0.5})
    assert "another law" in moved["error"] and moved["a"] is None
    # the summary hands the searched a to the Power scheduler and its YAML, and keeps the fit's a in "fit"
    sweep = wsd_sweep()
    fitted = calibrate_power.analyze(sweep, [], {"warmup_tokens": 1000})["power"]
    law = {key: fitted[key] for key in ("a", "b", "batch_exponent", "lr_max")}
    runs = [power_record(law, k, 0, 2.0 + (k + 1) ** 2) for k in (-2, -1.5, -1, -0.5, 0)]
    summary = calibrate_power.analyze(sweep, runs, {"warmup_tokens": 1000})
    assert summary["power"]["a"] == pytest.approx(summary["fit"]["a"] / 2, rel=1e-9)
    assert summary["power"]["amplitude_searched"] and summary["power"]["b"] == summary["fit"]["b"]
    scheduler = yaml.safe_load(summary["yaml"])["lr_scheduler"]["init_args"]
    assert scheduler["a"] == pytest.approx(summary["fit"]["a"] / 2, rel=1e-3)


def test_schedule_transfer_smoke(bench, tmp_path):
    schedule_transfer = bench("schedule_transfer")
    calibration = tmp_path / "calibration.json"
    law = {"a": 9.0, "b": -0.5, "batch_exponent": 0.5, "lr_max": 0.05, "amplitude_searched": True}
    calibration.write_text(json.dumps({"fit": {"a": 12.0, "b": -0.5, "batch_exponent": 0.5}, "power": law}))
    argv = [
        *TINY,
        "--width",
        "32",
        "--batch-sizes",
        "2",
        "4",
        "--token-budgets",
        "256",
        "512",
        "--grid-halfwidth",
        "1",
        "--seeds",
        "1",
        "--warmup-tokens",
        "64",
        "--calibration",
        str(calibration),
        "--out",
        str(tmp_path),
    ]
    assert schedule_transfer.main(argv) == 0
    result = load(tmp_path / "schedule_transfer_quick.json")
    cells = {"batch2_tokens256", "batch2_tokens512", "batch4_tokens256", "batch4_tokens512"}
    assert set(result["power_gap_vs_best_wsd"]) == cells
    assert result["power"]["a"] == 9.0 and result["power"]["grid_a"] == 12.0  # Power's a; the WSD law's a
    assert result["power"]["source"] == f"{calibration}; a from its Power amplitude search"
    assert result["power"]["batch_exponent"] == 0.5
    for cell, gap in result["power_gap_vs_best_wsd"].items():
        entry = result["cells"][cell]
        assert gap == pytest.approx(entry["power"]["loss"] / entry["wsd"]["best_loss"] - 1)
    assert {"power_within_1pct_of_best_wsd_in_every_cell"} == set(result["goals"])
    power_run = next(r for r in result["runs"] if r["schedule"] == "power")
    assert power_run["curve"][0][2] < 0.05  # warmup starts below lr_max
    assert power_run["power"]["a"] == 9.0 and not any(r.get("replayed") for r in result["runs"])
    # --resume replays every finished run from the JSON in --out and trains none; the result is the same
    assert schedule_transfer.main([*argv, "--resume"]) == 0
    again = load(tmp_path / "schedule_transfer_quick.json")
    assert len(again["runs"]) == len(result["runs"]) and all(r["replayed"] for r in again["runs"])
    assert again["power_gap_vs_best_wsd"] == result["power_gap_vs_best_wsd"]
    # another Power law: WSD and cosine replay, Power trains anew
    assert schedule_transfer.main([*argv, "--resume", "--a", "5.0"]) == 0
    moved = load(tmp_path / "schedule_transfer_quick.json")
    assert {r["schedule"] for r in moved["runs"] if not r.get("replayed")} == {"power"}
    assert all(r["power"]["a"] == 5.0 for r in moved["runs"] if r["schedule"] == "power")
    with pytest.raises(SystemExit, match="other settings.*width"):
        schedule_transfer.main([*argv, "--resume", "--width", "48"])


def test_schedule_transfer_takes_the_fit_itself_from_a_calibration_without_a_power_key(bench, tmp_path):
    schedule_transfer = bench("schedule_transfer")
    calibration = tmp_path / "old.json"
    calibration.write_text(json.dumps({"fit": {"a": 9.0, "b": -0.5}, "lr_max": 0.05}))
    flags = dict.fromkeys(("a", "b", "batch_exponent", "lr_max"))
    settings = schedule_transfer.power_settings(
        argparse.Namespace(calibration=str(calibration), **flags), tmp_path, "quick"
    )
    assert settings == {
        "a": 9.0,
        "b": -0.5,
        "batch_exponent": 1.0,
        "lr_max": 0.05,
        "grid_a": 9.0,
        "source": str(calibration),
    }
    flags["lr_max"] = 0.01
    settings = schedule_transfer.power_settings(argparse.Namespace(calibration=None, **flags), tmp_path, "quick")
    assert settings["a"] == 4.0 and settings["lr_max"] == 0.01 and "grid_a" not in settings
    assert settings["source"] == "paper defaults (arXiv 2408.13359, section 4); lr_max from the command line"
    # a calibration a time limit cut short is refused unless asked for
    calibration.write_text(json.dumps({"fit": {"a": 9.0, "b": -0.5}, "lr_max": 0.05, "complete": False}))
    flags["lr_max"] = None
    partial = argparse.Namespace(calibration=str(calibration), allow_partial_calibration=False, **flags)
    with pytest.raises(SystemExit, match="cut short.*--allow-partial-calibration"):
        schedule_transfer.power_settings(partial, tmp_path, "quick")
    partial.allow_partial_calibration = True
    assert schedule_transfer.power_settings(partial, tmp_path, "quick")["source"].endswith("an unfinished calibration")


def test_power_amplitude_search_trains_each_multiplier_and_resumes(bench, tmp_path):
    calibrate_power, common = bench("calibrate_power"), bench("common")
    config = calibrate_power.PRESETS["quick"] | {
        "context_length": 16,
        "depth": 1,
        "val_windows": 8,
        "base_width": 16,
        "width": 32,
        "workers": 1,
        "seeds": 2,
        "refine": 1,
        "warmup_tokens": 64,
        "amplitude_cell": [2, 256],
        "log2_amplitudes": [-0.5, 0.0, 0.5],
        "mode": "quick",
        "device": "cpu",
        "data": None,
        "overrides": {},
    }
    law = {"a": 4.0, "b": -0.5, "batch_exponent": 1.0, "lr_max": 0.02}
    path = tmp_path / "calibrate_power_quick.json"
    payload = common.new_payload("calibrate_power", config, "cpu") | {"runs": []}
    runs: list[dict] = []
    assert calibrate_power.search_amplitude(law, config, payload, runs, path, None)
    assert {-0.5, 0.0, 0.5} <= {r["log2_amplitude"] for r in runs} and len(load(path)["amplitude_runs"]) == len(runs)
    for r in runs:
        assert r["schedule"] == "power" and (r["batch_size"], r["tokens"]) == (2, 256)
        assert r["power"] == law | {"a": 4.0 * 2.0 ** r["log2_amplitude"]} and r["lr"] == pytest.approx(0.02)
    assert [r["seed"] for r in runs].count(1) == 1  # refine 1: the second seed at the best k only
    search = calibrate_power.amplitude_search(runs, law)
    assert search["error"] is None and search["a"] == pytest.approx(4.0 * 2.0 ** search["log2_multiplier"])
    # resuming replays each run bit for bit; around another law nothing replays
    replay = common.replay_finished(path, config, "cpu", run_lists=("runs", "amplitude_runs"))
    again: list[dict] = []
    assert calibrate_power.search_amplitude(law, config, payload, again, path, replay)
    assert all(r["replayed"] for r in again)
    assert sorted((r["log2_amplitude"], r["seed"], r["val_loss"]) for r in again) == sorted(
        (r["log2_amplitude"], r["seed"], r["val_loss"]) for r in runs
    )
    other: list[dict] = []
    calibrate_power.search_amplitude(law | {"b": -0.4}, config, payload, other, tmp_path / "other.json", replay)
    assert other and not any(r.get("replayed") for r in other)
    with pytest.raises(SystemExit, match="other settings.*val_windows"):
        common.replay_finished(path, config | {"val_windows": 16}, "cpu")
    saved = load(path)
    saved["environment"]["torch"] = "0.0"
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="another machine .torch"):
        common.replay_finished(path, config, "cpu")


def test_lr_sweep_extends_past_an_edge_then_refines_around_the_best(bench):
    sweep = bench("common").LRSweep(seeds=3, refine=3)
    assert sweep.start("g", [-6, -5, -4]) == [(-6, 0), (-5, 0), (-4, 0)]
    loss = {-7: 2.6, -6: 2.4, -5: 2.2, -4: 2.1, -3: 2.0, -2: 2.3}.get
    assert sweep.record("g", -6, 0, loss(-6)) == [] and sweep.record("g", -5, 0, loss(-5)) == []
    assert sweep.record("g", -4, 0, loss(-4)) == [(-3, 0)]  # best at the upper edge: extend
    follow = sweep.record("g", -3, 0, loss(-3))
    assert follow == [(-2, 0)]
    follow = sweep.record("g", -2, 0, loss(-2))  # -3 is now inside: seeds 1 and 2 at -4, -3, -2
    assert sorted(follow) == sorted((x, s) for x in (-4, -3, -2) for s in (1, 2))
    assert sweep.record("g", -3, 1, 2.0) == []


def test_mup_transfer_analysis_finds_the_drift_of_synthetic_optima(bench):
    mup_transfer = bench("mup_transfer")
    runs = []
    for width in (32, 64, 128, 256):
        optimum = {"sp": -5 - math.log2(width / 32), "mup": -5.2}  # SP's optimum falls 1 log2 unit per doubling
        for param, best in optimum.items():
            for x in range(-10, -1):
                loss = 2.0 - 0.01 * math.log2(width) + 0.05 * (x - best) ** 2
                run = {"parametrization": param, "width": width, "log2_lr": float(x), "seed": 0, "val_loss": loss}
                runs.append(run | {"stopped_early": False})
    # a run that blew up and was stopped counts as diverged, whatever loss it had when it stopped
    blown_up = {
        "parametrization": "sp",
        "width": 256,
        "log2_lr": -1.0,
        "seed": 0,
        "val_loss": 0.5,
        "stopped_early": True,
    }
    runs.append(blown_up)
    summary = mup_transfer.analyze(runs)
    assert summary["drift_log2"]["sp"] == pytest.approx(-3.0, abs=1e-9)
    assert summary["drift_log2"]["mup"] == pytest.approx(0.0, abs=1e-9)
    assert summary["optimal_log2_lr"]["mup"][256] == pytest.approx(-5.2, abs=1e-9)
    goals = summary["goals"]
    assert goals["mup_drift_within_0.5"]["met"] and goals["sp_optimum_moves_more_than_0.5"]["met"]
    assert goals["mup_wider_better_at_transferred_lr"]["met"]
    # muP at the widest width, at the LR transferred from the narrowest (2^-5), vs SP's best there (2^-8)
    quality = goals["mup_widest_within_1pct_of_sp_best"]
    assert quality["mup_transferred_vs_sp_best"] == pytest.approx(0.05 * 0.2**2 / (2.0 - 0.08), rel=1e-9)
    assert quality["met"]


def gpu_check_smoke_command(out: Path) -> list[str]:
    """``gpu_check.py`` as a CPU smoke run: 4 steps of a tiny model, fp32."""
    import sys

    smoke = ["--accelerator", "cpu", "--precision", "32-true", "--steps", "4", "--width", "64", "--depth", "1"]
    smoke += ["--context", "16", "--global-batch", "8", "--out", str(out)]
    return [sys.executable, str(BENCHMARKS / "gpu_check.py"), *smoke]


@pytest.mark.distributed
def test_gpu_check_runs_on_cpu_and_reports_every_comparison(tmp_path):
    import subprocess

    from tests.helpers.jobs import job_env

    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        gpu_check_smoke_command(out),
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = load(out)
    compared = [row["run"] for row in report["runs"] if "passed" in row]
    assert compared == ["fsdp x1", "fsdp2 x1", "single, SIGKILL + resume"] and report["passed"] is True
    assert report["complete"] is True
    for row in report["runs"][1:]:
        assert row["lrs_equal"] and row["tokens_equal"] and row["max_loss_rel_diff"] < 1e-5
    assert "all passed: yes" in result.stdout


@pytest.mark.distributed
def test_gpu_check_stopped_by_sigterm_keeps_the_finished_runs(tmp_path):
    import signal
    import subprocess
    import time

    from tests.helpers.jobs import job_env

    out = tmp_path / "gpu_check.json"
    process = subprocess.Popen(
        gpu_check_smoke_command(out),
        cwd=tmp_path,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not out.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the JSON appears once the first run ("single") has finished
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output[-3000:]
    report = load(out)
    assert report["complete"] is False and report["passed"] is False
    assert report["runs"][0]["run"] == "single" and "stopped by SIGTERM" in output


def test_cells_no_run_could_train_fail_before_any_run(bench, tmp_path):
    calibrate_power, schedule_transfer = bench("calibrate_power"), bench("schedule_transfer")
    base = [*TINY, "--width", "32", "--batch-sizes", "2", "--warmup-tokens", "64", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="token budget 100 must be a multiple of batch 2 x context 16"):
        schedule_transfer.main([*base, "--token-budgets", "256", "100", "--a", "4", "--b", "-0.5", "--lr-max", "0.01"])
    with pytest.raises(SystemExit, match="--warmup-tokens 256 leaves no steps after warmup in the cell of batch 2"):
        calibrate_power.main([*base, "--token-budgets", "256", "512", "--warmup-tokens", "256"])
    with pytest.raises(SystemExit, match="token budget 500 must be a multiple of batch 3"):  # the amplitude cell too
        calibrate_power.main([*base, "--token-budgets", "256", "512", "--amplitude-cell", "3", "500"])
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_plan_checks_every_preset_and_trains_nothing(bench, mode, tmp_path, capsys):
    """``--plan`` on the GPU presets too: a preset that cannot run fails here, on CPU, not in a device session."""
    flags = ["--plan", "--device", "cpu", "--out", str(tmp_path)] + (["--quick"] if mode == "quick" else [])
    paper_power = ["--a", "4", "--b", "-0.51", "--lr-max", "0.02"]  # no calibration of the full mode is committed
    first_wave = {}
    for name, extra in [("mup_transfer", []), ("calibrate_power", []), ("schedule_transfer", paper_power)]:
        assert bench(name).main(flags + extra) == 0
        printed = capsys.readouterr().out
        first_wave[name] = int(printed.split(": ")[1].split(" runs")[0])

    mup, calibrate = bench("mup_transfer").PRESETS[mode], bench("calibrate_power").PRESETS[mode]
    schedule = bench("schedule_transfer").PRESETS[mode]
    assert first_wave["mup_transfer"] == len(mup["parametrizations"]) * len(mup["widths"]) * len(mup["log2_lrs"])
    cells = len(calibrate["batch_sizes"]) * len(calibrate["token_budgets"])
    assert first_wave["calibrate_power"] == cells * len(calibrate["log2_lrs"])
    cells = len(schedule["batch_sizes"]) * len(schedule["token_budgets"])
    tuned = 2 * (2 * schedule["grid_halfwidth"] + 1)  # WSD and cosine grids
    assert first_wave["schedule_transfer"] == cells * (tuned + schedule["seeds"])  # Power: every seed at once
    assert not list(tmp_path.iterdir())
