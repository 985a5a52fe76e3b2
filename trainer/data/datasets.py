"""Dataset builders: each returns train/val/test splits held in memory as ``TensorDataset``s.

The builders are plain functions with annotated keyword arguments, so a Hydra config can name
one as ``_target_: trainer.data.datasets.digits``. Every builder is deterministic given its
arguments, needs no network, and leaves torch's, numpy's and Python's global RNG state alone.
"""

import contextlib
import os
import random
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from trainer.errors import ConfigError


@dataclass(frozen=True)
class DataSplits:
    """The three splits of a dataset and what a model needs to know about it."""

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]  # shape of one input sample
    num_classes: int  # classes; the vocabulary size for language modelling
    task: str = "classification"  # or "language_modeling"


def as_splits(data: object, key: str, count_classes: bool = True) -> DataSplits:
    """`data` as DataSplits: a builder's DataSplits as it is, or (train[, val[, test]]) map-style
    datasets of (input, target) items, whose input shape is the first input's and whose class
    count is one more than the largest training target (0 unless `count_classes`: a model built
    by the caller needs none, and counting reads every item). An item that is not an (input,
    target) pair is a ConfigError naming `key`."""
    if isinstance(data, DataSplits):
        splits = data
    else:
        parts = list(data) if isinstance(data, (tuple, list)) else []
        if not 1 <= len(parts) <= 3 or not all(p is None or _map_style(p) for p in parts):
            raise ConfigError(
                f"{key}: must be DataSplits or (train, val, test) datasets; got {_described(data)}"
            )
        train, val, test = (*(p if p is not None else _EMPTY for p in parts), _EMPTY, _EMPTY)[:3]
        inputs, _ = _pair(train, "train", key)
        classes = _num_classes(train) if count_classes else 0
        splits = DataSplits(train, val, test, tuple(inputs.shape), classes)
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)):
            _pair(getattr(splits, name), name, key)
    return splits


_EMPTY = TensorDataset(torch.empty(0), torch.empty(0, dtype=torch.int64))


def _pair(split: Dataset, name: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first item of `split` as (input, target) tensors, or a ConfigError saying what it is."""
    if not len(split):
        raise ConfigError(f"{key}: the {name} split is empty")
    item = split[0]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        with contextlib.suppress(TypeError):
            inputs, targets = default_collate([item])
            if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
                return inputs[0], targets[0]
    raise ConfigError(
        f"{key}: the {name} split's items must be (input, target) pairs of tensors or numbers; "
        f"item 0 is {_described(item)}"
    )


def _map_style(dataset: object) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _described(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _num_classes(train: Dataset) -> int:
    if type(train) is TensorDataset:  # the targets at once, not one item at a time
        return int(train.tensors[1].max()) + 1
    return max(int(torch.as_tensor(train[i][1]).max()) for i in range(len(train))) + 1


# --------------------------------------------------------------------------- helpers


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got "
            f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r}"
        )


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _split_sizes(n: int, *fractions: float) -> list[int]:
    """Sizes ``[rest, round(n * f) for f in fractions]`` of ``n`` items; every part non-empty."""
    parts = [round(n * f) for f in fractions]
    sizes = [n - sum(parts), *parts]
    if min(sizes) < 1:
        raise ValueError(f"{n} samples are too few to split by fractions {fractions}: {sizes}")
    return sizes


def _random_split(x: torch.Tensor, y: torch.Tensor, sizes: list[int], seed: int) -> list[Dataset]:
    """Shuffle ``(x, y)`` with a private generator and cut it into datasets of ``sizes``."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [TensorDataset(x[idx], y[idx]) for idx in torch.split(order, sizes)]


# --------------------------------------------------------------------------- builders


def synthetic(
    num_samples: int = 8192,
    input_shape: Sequence[int] = (64,),
    num_classes: int = 10,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Gaussian inputs labelled by a fixed random linear teacher (argmax of ``W x``).

    Cheap to build at any size and learnable by a linear model; meant for benchmarks.
    """
    input_shape = tuple(int(d) for d in input_shape)
    _check_at_least("num_samples", num_samples, 1)
    _check_at_least("num_classes", num_classes, 2)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be non-empty with sizes >= 1, got {input_shape!r}")
    _check_split_fractions(val_fraction, test_fraction)
    sizes = _split_sizes(num_samples, val_fraction, test_fraction)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *input_shape, generator=gen)
    teacher = torch.randn(x[0].numel(), num_classes, generator=gen)
    teacher /= teacher.norm(dim=0, keepdim=True)  # equal-norm columns -> roughly balanced classes
    y = (x.flatten(1) @ teacher).argmax(dim=1)
    train, val, test = _random_split(x, y, sizes, seed)
    return DataSplits(train, val, test, input_shape, num_classes)


def digits(val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download).

    Pixels are scaled from 0..16 to [0, 1]; the splits are stratified by class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split_fractions(val_fraction, test_fraction)
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    _, n_val, n_test = _split_sizes(len(y), val_fraction, test_fraction)

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, stratify=y_rest, random_state=seed
    )
    train, val, test = (
        TensorDataset(torch.from_numpy(a), torch.from_numpy(b))
        for a, b in ((x_train, y_train), (x_val, y_val), (x_test, y_test))
    )
    return DataSplits(train, val, test, (1, 8, 8), 10)


def mnist1d(
    num_samples: int = 5000,
    train_fraction: float = 0.8,
    val_fraction: float = 0.1,
    seed: int = 42,
) -> DataSplits:
    """MNIST-1D (Greydanus, 2020): 1-D signals of length 40 in 10 classes, generated offline.

    Built with ``mnist1d.data.make_dataset``; the defaults reproduce the published
    4000 train / 1000 test set. The package's test split is kept as test, and ``val_fraction``
    of its train split is carved off as validation. ``num_samples`` is rounded down to a
    multiple of 10 (the package makes the same number of samples per class).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    _check_at_least("num_samples", num_samples, 10)
    _check_fraction("train_fraction", train_fraction)
    _check_fraction("val_fraction", val_fraction)
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_fraction, seed

    # make_dataset seeds numpy's and Python's global RNGs; give the caller theirs back.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x.astype(np.float32)[:, None, :]), torch.from_numpy(
            y.astype(np.int64)
        )

    x_train, y_train = tensors(data["x"], data["y"])
    x_test, y_test = tensors(data["x_test"], data["y_test"])
    if len(y_test) < 1:
        raise ValueError(f"train_fraction={train_fraction!r} leaves no test samples")
    train, val = _random_split(x_train, y_train, _split_sizes(len(y_train), val_fraction), seed)
    return DataSplits(train, val, TensorDataset(x_test, y_test), (1, x_test.shape[-1]), 10)


_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _stdlib_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's ``.py`` files, concatenated in path order.

    Test suites, IDLE, installed packages and the machine-specific ``_sysconfigdata`` are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        paths += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    chunks, total = [], 0
    for path in sorted(paths):
        if total >= max_bytes:
            break
        with open(path, "rb") as f:
            chunks.append(f.read(max_bytes - total))
        total += len(chunks[-1])
    if total == 0:
        raise RuntimeError(f"no Python source files found under the stdlib path {root!r}")
    return b"".join(chunks)


def stdlib_text(
    block_size: int = 128,
    max_bytes: int = 2_000_000,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> DataSplits:
    """Byte-level (vocabulary 256) language modelling on the Python standard library's source.

    The byte stream is split contiguously into train/val/test, and each split is cut into
    non-overlapping windows of ``block_size + 1`` bytes: ``x = window[:-1]``, ``y = window[1:]``.
    """
    _check_at_least("block_size", block_size, 1)
    _check_at_least("max_bytes", max_bytes, 1)
    _check_split_fractions(val_fraction, test_fraction)
    stream = np.frombuffer(_stdlib_corpus(max_bytes), dtype=np.uint8)
    window = block_size + 1

    splits, start = [], 0
    for size in _split_sizes(len(stream), val_fraction, test_fraction):
        n_windows = size // window
        if n_windows < 1:
            raise ValueError(
                f"max_bytes={max_bytes!r} is too small for block_size={block_size!r}: "
                f"a split of {size} bytes holds no window of {window} bytes"
            )
        blocks = torch.from_numpy(stream[start : start + n_windows * window].astype(np.int64))
        blocks = blocks.view(n_windows, window)
        splits.append(TensorDataset(blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()))
        start += size
    train, val, test = splits
    return DataSplits(train, val, test, (block_size,), 256, task="language_modeling")
