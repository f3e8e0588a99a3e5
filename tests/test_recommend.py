"""``lightning-power recommend``: the Step Law numbers and a PowerScheduler YAML that builds and matches them."""

import pytest
import torch
import yaml

from lightning_power.cli import main as cli_main
from lightning_power.recommend import main
from lightning_power.schedulers import PowerScheduler


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


def test_the_printed_yaml_builds_a_scheduler(capsys):
    out = recommend(capsys, "--params", "3e6", "--tokens", "5e7", "--sequence-length", "256")
    config = yaml.safe_load(out)["lr_scheduler"]
    assert config["class_path"] == "lightning_power.PowerScheduler"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    scheduler = PowerScheduler(optimizer, **config["init_args"])
    assert scheduler.tokens_per_step % 256 == 0  # whole sequences


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
    ],
)
def test_bad_input_exits_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "lightning-power recommend" in capsys.readouterr().err
