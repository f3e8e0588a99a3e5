"""``lightning-power recommend``: the Step Law numbers and a PowerScheduler YAML that builds and matches them."""

import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_class

from lightning_power.cli import main as cli_main
from lightning_power.recommend import main
from lightning_power.schedulers import PowerScheduler
from tests.helpers.jobs import CONFIGS
from tests.helpers.tiny import tiny_cli_args
from tests.test_cli import RecordLR

DEMO = str(CONFIGS / "gpt_demo.yaml")


def recommend(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_prints_the_step_law_optimum_and_a_matching_power_scheduler(capsys):
    out = recommend(capsys, "--params", "1e9", "--tokens", "1e11")
    # by hand: eta = 1.79 * 1e9^-0.713 * 1e11^0.307 = 10^-2.7871 = 1.632e-3; B = 0.58 * 1e11^0.571 = 1.108e6 tokens
    assert "= 0.001632" in out
    assert "1.108e+06 tokens -> 270 x 4096 = 1105920" in out
    init_args = yaml.safe_load(out)["lr_scheduler"]["init_args"]
    assert init_args["tokens_per_step"] == 1105920
    assert init_args["total_tokens"] == 10**11 and init_args["decay_tokens"] == 10**10
    assert init_args["warmup_tokens"] == 10**9  # the paper's 1B-token warmup
    # 1e11 / 1105920 = 90422.45 steps: the last, partial one is trained too
    assert "# Train for 90423 optimizer steps of 1105920 tokens." in out
    assert (init_args["b"], init_args["lr_max"]) == (-0.51, 0.02)
    # the matching a: beta * a * D^b equals eta* at beta = 1105920 / 4096 = 270 sequences
    assert 270 * init_args["a"] * 1e11**-0.51 == pytest.approx(1.632e-3, rel=1e-3)


def test_an_optimum_above_the_paper_cap_raises_lr_max_to_it(capsys):
    out = recommend(capsys, "--params", "1e6", "--tokens", "1e8")  # eta* = 0.02697 > 0.02
    init_args = yaml.safe_load(out)["lr_scheduler"]["init_args"]
    assert init_args["lr_max"] == pytest.approx(0.02697, rel=1e-3)
    assert "is above 0.02: the matched lr_max is eta*" in out
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=init_args["lr_max"])
    scheduler = PowerScheduler(optimizer, **init_args)
    scheduler.last_epoch = 10**8 // init_args["tokens_per_step"] - 1  # the step that reaches D, before the decay
    assert scheduler.factor() * init_args["lr_max"] > 0  # a real LR
    sequences = init_args["tokens_per_step"] // 4096
    assert sequences * init_args["a"] * 1e8**-0.51 == pytest.approx(init_args["lr_max"], rel=1e-3)  # law = eta* at D


def test_the_printed_yaml_drives_a_cli_fit(capsys, tmp_path, monkeypatch):
    out = recommend(capsys, "--params", "3e6", "--tokens", "5e7", "--sequence-length", "256")
    config = yaml.safe_load(out)
    assert config["lr_scheduler"]["class_path"] == "lightning_power.PowerScheduler"
    assert config["optimizer"]["init_args"]["lr"] == config["lr_scheduler"]["init_args"]["lr_max"]
    (tmp_path / "recommended.yaml").write_text(out)
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["fit", "--config", DEMO, "--config", "recommended.yaml", *tiny_cli_args(max_steps=3), "--trainer.logger=false"]
        + ["--trainer.callbacks+=tests.test_cli.RecordLR"]
    )
    optimizer = instantiate_class([torch.nn.Parameter(torch.zeros(1))], config["optimizer"])
    scheduler = instantiate_class(optimizer, config["lr_scheduler"])
    assert scheduler.tokens_per_step % 256 == 0  # whole sequences
    expected = []
    for _ in range(3):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert RecordLR.lrs == pytest.approx(expected, rel=1e-12)


def test_the_cli_dispatches_recommend(capsys):
    assert cli_main(["recommend", "--params", "1e8", "--tokens", "1e10"]) == 0
    assert "class_path: lightning_power.PowerScheduler" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--params", "0", "--tokens", "1e9"],
        ["--params", "1e8"],
        ["--params", "1e8", "--tokens", "1e9", "--sequence-length", "0"],
        ["--params", "inf", "--tokens", "1e9"],
        ["--params", "1e8", "--tokens", "inf"],
        ["--params", "1e8", "--tokens", "0.5"],
        ["--params", "1e8", "--tokens", "4000"],  # under one 4096-token sequence
    ],
)
def test_bad_input_exits_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "lightning-power recommend" in capsys.readouterr().err


def test_beta_counts_4096_token_sequences_whatever_the_sequence_length(capsys):
    out = recommend(capsys, "--params", "1e9", "--tokens", "1e11", "--sequence-length", "2048")
    assert "1.108e+06 tokens -> 541 x 2048 = 1107968" in out
    init_args = yaml.safe_load(out)["lr_scheduler"]["init_args"]
    assert init_args["tokens_per_step"] == 1107968
    # the scheduler (beta in 4096-token sequences by default), halfway through the stable phase, follows
    # beta * a * n^b; extrapolated to n = D, that law is eta* = 1.632e-3
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=init_args["lr_max"])
    scheduler = PowerScheduler(optimizer, **init_args)
    steps = 5 * 10**10 // init_args["tokens_per_step"]
    scheduler.last_epoch = steps - 1
    tokens = steps * init_args["tokens_per_step"]
    lr = scheduler.factor() * init_args["lr_max"]
    assert lr * (1e11 / tokens) ** -0.51 == pytest.approx(1.632e-3, rel=1e-3)


def test_a_budget_too_small_for_one_sequence_still_trains_one_per_step(capsys):
    out = recommend(capsys, "--params", "1e6", "--tokens", "1e6")  # B* = 1547 tokens, under half a sequence
    assert "1547 tokens -> 1 x 4096 = 4096" in out
    init_args = yaml.safe_load(out)["lr_scheduler"]["init_args"]
    assert init_args["tokens_per_step"] == 4096
    assert "# Train for 245 optimizer steps of 4096 tokens." in out  # 1e6 / 4096 = 244.1
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=init_args["lr_max"])
    PowerScheduler(optimizer, **init_args)
