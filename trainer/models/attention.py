"""Multi-head self-attention and the pre-norm transformer block (Vaswani et al. 2017).

Shared by `TransformerClassifier` and `TinyGPT`. Module names a tensor-parallel plan can refer
to, relative to each entry of a model's ``blocks`` (``nn.ModuleList``, one FSDP2 unit each):

- ``norm1``, ``norm2``: the ``nn.LayerNorm`` before attention and before the MLP
- ``attn.q``, ``attn.k``, ``attn.v``: ``nn.Linear(dim, dim)``, shard colwise
- ``attn.o``: ``nn.Linear(dim, dim)``, shard rowwise
- ``mlp.fc1``: ``nn.Linear(dim, mlp_ratio * dim)``, shard colwise
- ``mlp.fc2``: ``nn.Linear(mlp_ratio * dim, dim)``, shard rowwise
- ``drop_path``: `DropPath` (stochastic depth) on both residual branches; no parameters

Run-time knobs a schedule can set: ``SelfAttention.attn_dropout`` (a plain float, the dropout on
attention weights) and the ``p`` of the ``nn.Dropout`` modules (`DropoutSchedule`), and the ``p``
of each block's ``drop_path`` (`StochasticDepthSchedule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .drop_path import DropPath, check_rate, depth_scales


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention.

    Separate ``q``/``k``/``v``/``o`` projections (not one fused ``qkv``) so tensor parallelism
    can shard q/k/v colwise and o rowwise; heads are split with ``view(B, T, -1, head_dim)`` so
    a shard infers its local head count from its local width.

    Attributes:
        attn_dropout: float, dropout probability on the attention weights, used only in train
            mode. A plain attribute so callbacks can change it between steps.
        causal: bool, whether position t may only attend to positions <= t.
        dropout: ``nn.Dropout`` applied to the output projection (residual dropout).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        causal: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)
        self.attn_dropout = float(attn_dropout)
        self.causal = causal
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # (B, T, D) -> (B, heads, T, head_dim); -1 lets a tensor-parallel shard find its heads.
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.dropout(self.o(y))


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc1`` -> GELU -> ``fc2`` -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + drop_path(attn(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))``.

    Pre-norm (GPT-2 / ViT) keeps the residual path an identity, which trains stably without
    learning-rate warmup tricks at these small sizes. ``drop_path`` is this block's stochastic
    depth rate and ``depth_scale`` its share of the model's rate (`trainer.models.drop_path`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        causal: bool = False,
        drop_path: float = 0.0,
        depth_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(
            dim, heads, attn_dropout=attn_dropout, dropout=dropout, causal=causal
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio * dim, dropout=dropout)
        self.drop_path = DropPath(drop_path, depth_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def transformer_blocks(
    depth: int,
    dim: int,
    heads: int,
    *,
    mlp_ratio: int,
    dropout: float,
    attn_dropout: float,
    causal: bool,
    drop_path: float,
    drop_path_rule: str,
) -> nn.ModuleList:
    """``depth`` blocks; block ``i`` gets the drop-path rate ``drop_path * depth_scales[i]``."""
    rate = check_rate("drop_path", drop_path)
    return nn.ModuleList(
        TransformerBlock(
            dim,
            heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            causal=causal,
            drop_path=rate * scale,
            depth_scale=scale,
        )
        for scale in depth_scales(depth, drop_path_rule)
    )
