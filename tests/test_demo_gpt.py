import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_power.demo import GPT, ByteCorpus
from tests.helpers.tiny import TINY_DATA, TINY_MODEL


def test_shapes_and_parameter_layout():
    model = GPT(width=64, depth=3, n_heads=4, mlp_ratio=2.0, context_length=16)
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["token_embedding.weight"] == (256, 64)
    assert shapes["blocks.2.attn.qkv.weight"] == (192, 64)
    assert shapes["blocks.2.mlp.fc.weight"] == (128, 64)
    assert shapes["head.weight"] == (256, 64)
    assert model.blocks[0].attn.n_heads == 4 and model.blocks[0].attn.head_dim == 16
    assert GPT(width=64, head_dim=8).blocks[0].attn.n_heads == 8


def test_sequences_longer_than_the_context_name_both_settings():
    model = GPT(width=32, depth=1, context_length=16)
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)  # shorter is fine
    with pytest.raises(ValueError, match=r"17 tokens.*context_length=16.*data.init_args.context_length"):
        model(torch.randint(0, 256, (2, 17)))


@pytest.mark.parametrize("heads", [{"n_heads": 4}, {"head_dim": 8}, {}])
def test_saved_hyperparameters_rebuild_the_same_model(heads):
    model = GPT(width=32, depth=1, context_length=8, **heads)
    rebuilt = GPT(**model.hparams)
    assert dict(rebuilt.hparams) == dict(model.hparams)
    assert rebuilt.blocks[0].attn.n_heads == model.blocks[0].attn.n_heads


def test_zero_init_readout_predicts_uniform_bytes():
    model = GPT(**TINY_MODEL, zero_init_readout=True)
    tokens = torch.randint(0, 256, (3, 16))
    loss = model.loss((tokens, tokens))
    assert loss.item() == pytest.approx(math.log(256), rel=1e-6)


def test_zero_init_query_zeroes_only_the_query_rows():
    model = GPT(**TINY_MODEL, zero_init_query=True)
    qkv = model.blocks[0].attn.qkv.weight
    assert torch.count_nonzero(qkv[:32]) == 0 and torch.count_nonzero(qkv[32:]) == qkv[32:].numel()


def test_attention_scale_and_multipliers():
    sp, mup = GPT(width=64, head_dim=16), GPT(width=64, head_dim=16, attention_scale="1/d_head")
    assert sp.blocks[0].attn.scale == pytest.approx(1 / 4) and mup.blocks[0].attn.scale == pytest.approx(1 / 16)
    # readout_multiplier scales the final hidden state; the head has no bias, so logits scale by the same factor.
    torch.manual_seed(0)
    base = GPT(**TINY_MODEL)
    scaled = GPT(**TINY_MODEL, readout_multiplier=0.5)
    scaled.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(scaled(tokens), 0.5 * base(tokens))


def test_init_std_follows_gpt2_rule():
    torch.manual_seed(0)
    model = GPT(width=256, depth=8, head_dim=32, init_std=0.1)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.1, rel=0.02)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.1 / math.sqrt(16), rel=0.02)
    assert torch.count_nonzero(model.blocks[0].mlp.fc.bias) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 30, "n_heads": 4}, "width \\(30\\) must be divisible by n_heads \\(4\\)"),
        ({"width": 64, "head_dim": 24}, "multiple of head_dim"),
        ({"context_length": 1}, "context_length must be >= 2"),
        ({"n_heads": 2, "head_dim": 32}, "not both"),
        ({"attention_scale": "1/d"}, "attention_scale must be"),
        ({"depth": 0}, "depth must be > 0"),
        ({"width": 64, "mlp_ratio": 0.005}, r"mlp_ratio \* width must give an MLP of >= 1 unit, got 0.005 \* 64 = 0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT(**kwargs)


def test_loss_goes_down_on_the_demo_corpus():
    pl.seed_everything(0)
    model = GPT(**TINY_MODEL, learning_rate=1e-2)
    data = ByteCorpus(**TINY_DATA)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=4,
    )
    before = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    assert before == pytest.approx(math.log(256), rel=0.02)
    assert after < before - 1.0
