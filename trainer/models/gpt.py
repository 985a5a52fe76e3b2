"""TinyGPT: a small decoder-only causal language model (GPT-2, Radford et al. 2019; in the
style of Karpathy's nanoGPT).

Token + learned position embeddings, ``depth`` pre-norm causal blocks, final LayerNorm and a
linear LM head. The head is not tied to the token embedding: tying complicates tensor-parallel
sharding (the two would need matching layouts).

Module names (for FSDP2 wrapping and tensor-parallel plans):

- ``tok_emb``: ``nn.Embedding(vocab, dim)``; ``pos_emb``: ``nn.Embedding(block_size, dim)``
- ``blocks``: ``nn.ModuleList`` of `TransformerBlock`, each with ``norm1``, ``attn``
  (``q``/``k``/``v``/``o``), ``norm2``, ``mlp`` (``fc1``/``fc2``), ``drop_path``
- ``norm``: final ``nn.LayerNorm``; ``head``: ``nn.Linear(dim, vocab, bias=False)``

Attention-weight dropout lives in each ``blocks[i].attn.attn_dropout`` (a float that can be
changed at run time). ``drop_path`` is the stochastic depth rate (Huang et al. 2016): block ``i``
drops its residual branches with ``blocks[i].drop_path.p``, the same rate for every block
(``drop_path_rule=constant``) or rising linearly from 0 at the first block to ``drop_path`` at the
last (``linear``, the default); see `trainer.models.drop_path`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .attention import transformer_blocks


class TinyGPT(nn.Module):
    """Causal LM. ``input_shape=(block_size,)``, ``num_classes`` is the vocabulary size.

    ``forward(idx)`` takes token ids ``(B, T)`` with ``T <= block_size`` and returns logits
    ``(B, T, vocab)``.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        drop_path_rule: str = "linear",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 1:
            raise ValueError(f"TinyGPT expects input_shape=(block_size,), got {self.input_shape}")
        self.block_size = self.input_shape[0]
        self.num_classes = num_classes
        self.tok_emb = nn.Embedding(num_classes, dim)
        self.pos_emb = nn.Embedding(self.block_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = transformer_blocks(
            depth,
            dim,
            heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            causal=True,
            drop_path=drop_path,
            drop_path_rule=drop_path_rule,
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # GPT-2 init: N(0, 0.02) weights, zero biases; the projections that write into the
        # residual stream (attn.o, mlp.fc2) are scaled by 1/sqrt(2 * depth) so the residual
        # variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * depth)
        for block in self.blocks:
            nn.init.normal_(block.attn.o.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.fc2.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
