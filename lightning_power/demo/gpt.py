"""A byte-level GPT: a decoder-only, pre-norm transformer over raw bytes (vocabulary 256).

Read it top to bottom: ``CausalSelfAttention``, ``MLP``, ``Block``, then the ``GPT`` LightningModule. The muP knobs
are plain, named constructor arguments. They are all off (standard parametrization) by default::

    embedding_multiplier   x  token + position embeddings          (paper: m_emb, alpha_in)
    readout_multiplier     x  final hidden state before the head   (alpha_out; muP's 1/width_mult is added by MuP)
    attention_scale        "1/sqrt(d_head)" (SP) or "1/d_head" (muP, Tensor Programs V Def. 4.1)
    residual_multiplier    x  each attention / MLP branch before the residual add   (m_res)
    init_std               std of every weight matrix and embedding at init
    zero_init_readout      zero the output head at init (Tensor Programs V, App. D.2)
    zero_init_query        zero the query projection at init (Tensor Programs V, App. D.2)

Example::

    >>> import torch
    >>> from lightning_power.demo import GPT
    >>> model = GPT(width=64, depth=2, n_heads=4, context_length=16)
    >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

if TYPE_CHECKING:
    from lightning.pytorch.utilities import AttributeDict

AttentionScale = Literal["1/sqrt(d_head)", "1/d_head"]
VOCAB_SIZE = 256  # one token per byte


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, attention_scale: AttentionScale) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = width // n_heads
        self.scale = 1.0 / self.head_dim if attention_scale == "1/d_head" else 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(width, 3 * width)  # rows [0, width) are the query projection
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, time, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + m_res * attn(norm(x))``, then ``x + m_res * mlp(norm(x))``."""

    def __init__(
        self, width: int, n_heads: int, mlp_hidden: int, attention_scale: AttentionScale, residual_multiplier: float
    ) -> None:
        super().__init__()
        self.residual_multiplier = residual_multiplier
        self.attn_norm = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_heads, attention_scale)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.residual_multiplier * self.attn(self.attn_norm(x))
        return x + self.residual_multiplier * self.mlp(self.mlp_norm(x))


class GPT(pl.LightningModule):
    """Decoder-only byte-level transformer with the muP knobs as plain arguments.

    Args:
        width: model dimension d.
        depth: number of transformer blocks.
        n_heads: attention heads; ``width`` must be divisible by it. Give ``n_heads`` or ``head_dim``, not both.
        head_dim: size of each head (default 32 when ``n_heads`` is not given); heads = ``width / head_dim``.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        context_length: tokens (bytes) per sequence; at least 2.
        embedding_multiplier: scales the embedding output.
        readout_multiplier: scales the last hidden state before the output head.
        attention_scale: ``"1/sqrt(d_head)"`` (standard) or ``"1/d_head"`` (muP).
        residual_multiplier: scales each attention and MLP branch before the residual add.
        init_std: std of the normal init of every weight matrix and embedding. Output projections of each
            block get ``init_std / sqrt(2 * depth)`` (GPT-2).
        zero_init_readout: initialise the output head to zero.
        zero_init_query: initialise the query rows of each attention's ``qkv`` projection to zero.
        learning_rate: AdamW learning rate of the module's own ``configure_optimizers`` (unused when an
            optimizer is chosen in the CLI).
        weight_decay: AdamW weight decay of the module's own ``configure_optimizers``.
    """

    def __init__(
        self,
        width: int = 128,
        depth: int = 4,
        n_heads: int | None = None,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        context_length: int = 128,
        embedding_multiplier: float = 1.0,
        readout_multiplier: float = 1.0,
        attention_scale: AttentionScale = "1/sqrt(d_head)",
        residual_multiplier: float = 1.0,
        init_std: float = 0.02,
        zero_init_readout: bool = False,
        zero_init_query: bool = False,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        heads = _resolve_heads(width, n_heads, head_dim)
        _check_positive(width=width, depth=depth, mlp_ratio=mlp_ratio, init_std=init_std, learning_rate=learning_rate)
        mlp_hidden = round(mlp_ratio * width)
        if mlp_hidden < 1:
            raise ValueError(f"mlp_ratio * width must give an MLP of >= 1 unit, got {mlp_ratio} * {width} = 0")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (one input and one target byte), got {context_length}")
        if attention_scale not in ("1/sqrt(d_head)", "1/d_head"):
            raise ValueError(f"attention_scale must be '1/sqrt(d_head)' or '1/d_head', got {attention_scale!r}")
        self.save_hyperparameters()
        self.width, self.depth, self.context_length = width, depth, context_length
        self.embedding_multiplier = embedding_multiplier
        self.readout_multiplier = readout_multiplier

        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = nn.Embedding(context_length, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_hidden, attention_scale, residual_multiplier) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE, bias=False)
        self._init_weights(init_std, zero_init_readout, zero_init_query)

        self.val_loss = MeanMetric()
        self.val_bpb = MeanMetric()
        self.test_loss = MeanMetric()

    @torch.no_grad()
    def _init_weights(self, std: float, zero_init_readout: bool, zero_init_query: bool) -> None:
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() >= 2:  # weight matrices and embeddings; LayerNorm weights keep their ones
                is_output_projection = name.endswith("proj.weight")
                param.normal_(0.0, std / math.sqrt(2 * self.depth) if is_output_projection else std)
        if zero_init_readout:
            self.head.weight.zero_()
        if zero_init_query:
            for block in self.blocks:
                cast(Block, block).attn.qkv.weight[: self.width].zero_()  # nn.ModuleList yields any Module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, time, 256)`` for byte ids ``tokens`` of shape ``(batch, time)``."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"GPT got sequences of {tokens.shape[1]} tokens but has position embeddings for context_length="
                f"{self.context_length}; make the data's context_length (ByteCorpus: data.init_args.context_length) "
                "at most the model's (model.init_args.context_length)"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding_multiplier * (self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.readout_multiplier * self.final_norm(x))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-byte cross-entropy in nats, computed in float32."""
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global-batch mean under DDP/FSDP
        return loss

    def on_validation_epoch_start(self) -> None:
        # Fresh states in the current grad mode: states left by an earlier run under inference_mode (e.g.
        # trainer.validate before trainer.fit) cannot be updated in place under no_grad.
        self.val_loss.reset()
        self.val_bpb.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, weight = self.loss(batch), batch[1].numel()
        self.val_loss.update(loss, weight=weight)
        self.val_bpb.update(loss / math.log(2), weight=weight)  # bytes are tokens: bits per byte = nats / ln 2
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/bpb", self.val_bpb, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_loss.update(self.loss(batch), weight=batch[1].numel())
        self.log("test/loss", self.test_loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = cast("AttributeDict", self.hparams)  # save_hyperparameters made it one
        return torch.optim.AdamW(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm under every strategy; FSDP1 needs its own ``clip_grad_norm_`` (sharded gradients)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            if isinstance(self.trainer.model, FullyShardedDataParallel):
                self.trainer.model.clip_grad_norm_(gradient_clip_val)
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        """Shard each block, then the root, when the trainer uses ``ModelParallelStrategy`` (FSDP2)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()):
            return
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "_fully_sharded", False):  # configure_model runs once per fit/validate/test
            return
        for block in self.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])
        self._fully_sharded = True


def _resolve_heads(width: int, n_heads: int | None, head_dim: int | None) -> int:
    if n_heads is not None and head_dim is not None:
        raise ValueError(f"give n_heads or head_dim, not both (got n_heads={n_heads}, head_dim={head_dim})")
    if n_heads is None:
        head_dim = 32 if head_dim is None else head_dim
        if head_dim <= 0 or width % head_dim:
            raise ValueError(f"width ({width}) must be a positive multiple of head_dim ({head_dim})")
        return width // head_dim
    if n_heads <= 0 or width % n_heads:
        raise ValueError(f"width ({width}) must be divisible by n_heads ({n_heads}); n_heads must be positive")
    return n_heads


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
