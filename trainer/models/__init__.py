"""Reference models. Each takes ``input_shape`` (one sample, no batch dim) and ``num_classes``
(the vocabulary size for `TinyGPT`) as keyword arguments, plus its own hyperparameters."""

from .cnn import CNN
from .gpt import TinyGPT
from .gru import GRUClassifier
from .mlp import MLP
from .transformer import TransformerClassifier

__all__ = ["CNN", "MLP", "GRUClassifier", "TinyGPT", "TransformerClassifier"]
