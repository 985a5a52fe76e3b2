"""Transformer encoder classifier (Vaswani et al. 2017; ViT-style head, Dosovitskiy et al. 2020).

A sample becomes a token sequence via `trainer.models.sequence.to_sequence`, is projected to
``dim``, gets learned position embeddings, runs through ``depth`` pre-norm blocks, is mean-pooled
over tokens, layer-normed and classified by a linear head.

Module names (for FSDP2 wrapping and tensor-parallel plans):

- ``embed``: ``nn.Linear(F, dim)`` input projection; ``pos_emb``: ``nn.Embedding(T, dim)``
- ``blocks``: ``nn.ModuleList`` of `TransformerBlock`, each with ``norm1``, ``attn``
  (``q``/``k``/``v``/``o``), ``norm2``, ``mlp`` (``fc1``/``fc2``), ``drop_path``
- ``norm``: final ``nn.LayerNorm``; ``head``: ``nn.Linear(dim, num_classes)``

Attention-weight dropout lives in each ``blocks[i].attn.attn_dropout`` (a float that can be
changed at run time). ``drop_path`` is the stochastic depth rate (Huang et al. 2016): block ``i``
drops its residual branches with ``blocks[i].drop_path.p``, the same rate for every block
(``drop_path_rule=constant``) or rising linearly from 0 at the first block to ``drop_path`` at the
last (``linear``, the default); see `trainer.models.drop_path`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import transformer_blocks
from .sequence import sequence_shape, to_sequence


class TransformerClassifier(nn.Module):
    """Pre-norm transformer encoder with mean pooling and a linear head."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        drop_path_rule: str = "linear",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        seq_len, features = sequence_shape(self.input_shape)
        self.embed = nn.Linear(features, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        # Small position embeddings (ViT/GPT-2 use std 0.02) so they don't swamp the
        # projected inputs at the start; nn.Embedding's default N(0, 1) would.
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = transformer_blocks(
            depth,
            dim,
            heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            causal=False,
            drop_path=drop_path,
            drop_path_rule=drop_path_rule,
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(to_sequence(x))  # (B, T, dim)
        pos = torch.arange(x.shape[1], device=x.device)
        x = self.dropout(x + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))
