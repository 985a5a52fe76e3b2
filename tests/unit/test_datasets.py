"""Tests for the dataset builders in trainer.data.datasets."""

import random

import numpy as np
import pytest
import torch

from trainer.data import datasets
from trainer.data.datasets import DataSplits, digits, mnist1d, stdlib_text, synthetic

# Small arguments keep the repeated builds fast; the defaults are exercised once each below.
SMALL = {
    "synthetic": lambda **kw: synthetic(num_samples=1000, **kw),
    "digits": digits,
    "mnist1d": lambda **kw: mnist1d(num_samples=500, **kw),
    "stdlib_text": lambda **kw: stdlib_text(block_size=32, max_bytes=100_000, **kw),
}


@pytest.fixture(scope="module")
def default_splits() -> dict[str, DataSplits]:
    return {name: getattr(datasets, name)() for name in SMALL}


def tensors(ds):
    return ds.tensors


def splits_of(s: DataSplits):
    return (s.train, s.val, s.test)


def assert_same(a: DataSplits, b: DataSplits) -> None:
    for da, db in zip(splits_of(a), splits_of(b), strict=True):
        for ta, tb in zip(tensors(da), tensors(db), strict=True):
            assert torch.equal(ta, tb)


# --------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "task", "x_dtype"),
    [
        ("synthetic", (64,), 10, "classification", torch.float32),
        ("digits", (1, 8, 8), 10, "classification", torch.float32),
        ("mnist1d", (1, 40), 10, "classification", torch.float32),
        ("stdlib_text", (128,), 256, "language_modeling", torch.int64),
    ],
)
def test_shapes_dtypes_and_metadata(default_splits, name, input_shape, num_classes, task, x_dtype):
    s = default_splits[name]
    assert isinstance(s, DataSplits)
    assert (s.input_shape, s.num_classes, s.task) == (input_shape, num_classes, task)
    for ds in splits_of(s):
        assert len(ds) > 0
        x, y = tensors(ds)
        assert x.shape[1:] == input_shape and x.dtype == x_dtype
        assert y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
        sample_x, sample_y = ds[0]
        assert tuple(sample_x.shape) == input_shape
        if task == "language_modeling":
            assert tuple(sample_y.shape) == input_shape
        else:
            assert sample_y.ndim == 0


def test_default_split_sizes(default_splits):
    sizes = {n: tuple(len(d) for d in splits_of(s)) for n, s in default_splits.items()}
    assert sizes["synthetic"] == (6554, 819, 819)
    assert sum(sizes["digits"]) == 1797 and sizes["digits"] == (1258, 180, 359)
    assert sizes["mnist1d"] == (3600, 400, 1000)
    train, val, test = sizes["stdlib_text"]
    assert train > 10 * val and val == test  # 90/5/5 of the byte stream


def test_synthetic_input_shape_and_classes_are_configurable():
    s = synthetic(num_samples=200, input_shape=[3, 4, 5], num_classes=3)
    assert s.input_shape == (3, 4, 5) and s.num_classes == 3
    assert s.train.tensors[0].shape[1:] == (3, 4, 5)
    assert set(s.train.tensors[1].tolist()) == {0, 1, 2}


def test_digits_pixels_are_scaled_to_unit_interval(default_splits):
    x = torch.cat([tensors(d)[0] for d in splits_of(default_splits["digits"])])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


# --------------------------------------------------------------------------- splits


def rows(ds) -> set[bytes]:
    x, y = tensors(ds)
    return {xi.numpy().tobytes() + yi.numpy().tobytes() for xi, yi in zip(x, y, strict=True)}


@pytest.mark.parametrize("name", ["synthetic", "digits", "mnist1d"])
def test_classification_splits_are_disjoint(default_splits, name):
    train, val, test = (rows(d) for d in splits_of(default_splits[name]))
    assert not train & val and not train & test and not val & test


def test_synthetic_splits_cover_all_samples():
    s = synthetic(num_samples=500, val_fraction=0.2, test_fraction=0.3)
    assert [len(d) for d in splits_of(s)] == [250, 100, 150]
    assert len(rows(s.train) | rows(s.val) | rows(s.test)) == 500


def test_digits_splits_cover_the_dataset_and_are_stratified(default_splits):
    from sklearn.datasets import load_digits

    s = default_splits["digits"]
    all_rows = rows(s.train) | rows(s.val) | rows(s.test)
    assert len(all_rows) == sum(len(d) for d in splits_of(s)) == 1797
    full = load_digits()
    expected = {
        (xi / 16.0).astype(np.float32).tobytes() + np.int64(yi).tobytes()
        for xi, yi in zip(full.data, full.target, strict=True)
    }
    assert all_rows == expected
    share = torch.bincount(torch.from_numpy(full.target)) / len(full.target)
    for ds in splits_of(s):
        counts = torch.bincount(tensors(ds)[1], minlength=10)
        assert (counts > 0).all()
        # stratified: each class's count is its overall share of the split, give or take one
        assert ((counts - share * len(ds)).abs() <= 1.0).all(), counts


def test_mnist1d_totals_and_test_split_match_make_dataset(default_splits):
    from mnist1d.data import get_dataset_args, make_dataset

    s = default_splits["mnist1d"]
    assert len(s.train) + len(s.val) + len(s.test) == 5000 and len(s.test) == 1000
    state = np.random.get_state(), random.getstate()
    try:
        reference = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    x_test, y_test = tensors(s.test)
    assert torch.equal(x_test, torch.from_numpy(reference["x_test"]).float().unsqueeze(1))
    assert torch.equal(y_test, torch.from_numpy(reference["y_test"]).long())
    # train + val together are exactly the package's train split, reshuffled
    ref_train = torch.from_numpy(reference["x"]).float().unsqueeze(1)
    ours = torch.cat([tensors(s.train)[0], tensors(s.val)[0]])
    assert {r.numpy().tobytes() for r in ours} == {r.numpy().tobytes() for r in ref_train}


# --------------------------------------------------------------------------- determinism and RNG


@pytest.mark.parametrize("name", ["synthetic", "digits", "mnist1d"])
def test_same_args_same_data_different_seed_different_split(name):
    build = SMALL[name]
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    assert_same(a, b)
    assert not torch.equal(tensors(a.test)[0], tensors(c.test)[0])


def test_stdlib_text_is_deterministic():
    assert_same(SMALL["stdlib_text"](), SMALL["stdlib_text"]())


@pytest.mark.parametrize("name", list(SMALL))
def test_builders_leave_global_rng_state_alone(name):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state(), random.getstate()
    SMALL[name]()
    after = torch.get_rng_state(), np.random.get_state(), random.getstate()
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1])
    assert before[1][2:] == after[1][2:]
    assert before[2] == after[2]


# --------------------------------------------------------------------------- stdlib_text


def window_bytes(ds) -> bytes:
    """The split's byte stream, rebuilt from its ``block_size + 1`` windows."""
    x, y = tensors(ds)
    return bytes(torch.cat([x, y[:, -1:]], dim=1).flatten().to(torch.uint8).tolist())


def test_stdlib_text_targets_are_inputs_shifted_by_one():
    s = SMALL["stdlib_text"]()
    for ds in splits_of(s):
        x, y = tensors(ds)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.max()) < 256 and int(x.min()) >= 0
    text = window_bytes(s.train)
    assert b"def " in text and b"import " in text
    printable = sum(32 <= b < 127 or b in b"\n\t" for b in text)
    assert printable / len(text) > 0.99  # source text, not arbitrary bytes


def test_stdlib_text_windows_are_contiguous_and_never_cross_splits():
    max_bytes, block = 100_000, 32
    corpus = datasets._stdlib_corpus(max_bytes)
    assert len(corpus) == max_bytes
    s = stdlib_text(block_size=block, max_bytes=max_bytes, val_fraction=0.1, test_fraction=0.1)
    boundaries = [0, 80_000, 90_000, 100_000]  # byte offsets where the three splits begin/end
    for i, ds in enumerate(splits_of(s)):
        stream = window_bytes(ds)
        start, end = boundaries[i], boundaries[i + 1]
        assert len(stream) == (end - start) // (block + 1) * (block + 1)
        # windows tile the split from its first byte, in order, and stop inside it
        assert stream == corpus[start : start + len(stream)]


# --------------------------------------------------------------------------- synthetic learnability


def test_synthetic_is_learnable_by_a_linear_model():
    from sklearn.linear_model import LogisticRegression

    s = synthetic(num_samples=3000, input_shape=(16,), num_classes=5, seed=3)
    x_train, y_train = (t.numpy() for t in tensors(s.train))
    x_test, y_test = (t.numpy() for t in tensors(s.test))
    model = LogisticRegression(max_iter=500).fit(x_train, y_train)
    accuracy = model.score(x_test, y_test)
    assert accuracy > 0.8, accuracy  # chance is 0.2


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("build", "kwargs", "argument"),
    [
        (synthetic, {"num_samples": 0}, "num_samples"),
        (synthetic, {"num_classes": 1}, "num_classes"),
        (synthetic, {"input_shape": (0, 4)}, "input_shape"),
        (synthetic, {"val_fraction": 0.0}, "val_fraction"),
        (synthetic, {"test_fraction": 1.5}, "test_fraction"),
        (synthetic, {"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        (digits, {"val_fraction": -0.1}, "val_fraction"),
        (digits, {"test_fraction": 1.0}, "test_fraction"),
        (digits, {"val_fraction": 0.6, "test_fraction": 0.6}, "test_fraction"),
        (mnist1d, {"num_samples": 0}, "num_samples"),
        (mnist1d, {"train_fraction": 1.0}, "train_fraction"),
        (mnist1d, {"val_fraction": 0.0}, "val_fraction"),
        (stdlib_text, {"block_size": 0}, "block_size"),
        (stdlib_text, {"max_bytes": 0}, "max_bytes"),
        (stdlib_text, {"val_fraction": 1.0}, "val_fraction"),
        (stdlib_text, {"test_fraction": 0.0}, "test_fraction"),
        (stdlib_text, {"val_fraction": 0.7, "test_fraction": 0.3}, "test_fraction"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(build, kwargs, argument):
    with pytest.raises(ValueError, match=argument) as info:
        build(**kwargs)
    assert repr(kwargs[argument]) in str(info.value)


def test_too_little_data_for_the_split_raises():
    with pytest.raises(ValueError, match="too few"):
        synthetic(num_samples=5)
    with pytest.raises(ValueError, match="block_size=64"):
        stdlib_text(block_size=64, max_bytes=1000)
