"""`trainer.api.fit` in this process: a plain map-style dataset trains and resumes exactly, a
DataLoader is taken as its dataset, and bad input raises ConfigError with nothing written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.api import fit
from trainer.config import ConfigError

QUICK = [
    "logger=[jsonl]",
    "callbacks=[]",
    "schedule=constant",
    "max_epochs=2",
    "data.batch_size=16",
]


class Points:
    """A map-style dataset that is no torch Dataset subclass: items made one at a time."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=gen)
        self.x = torch.randn(n, 6, generator=gen) + self.y[:, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


DATA = (Points(200, 0), Points(40, 1), Points(40, 2))  # 12 steps an epoch


def test_a_map_style_dataset_trains_and_resumes_bit_for_bit(tmp_path: Path):
    whole = net()
    uninterrupted = fit(model=whole, data=DATA, overrides=QUICK, run_dir=tmp_path / "whole")
    assert uninterrupted["steps"] == 24

    first = fit(model=net(), data=DATA, overrides=[*QUICK, "max_steps=7"], run_dir=tmp_path / "cut")
    assert first["steps"] == 7  # stopped mid-epoch, with its final checkpoint
    resumed_model = net()
    resumed = fit(
        model=resumed_model, data=DATA, overrides=[*QUICK, "resume=auto"], run_dir=tmp_path / "cut"
    )
    assert resumed["steps"] == 24
    for key in ("train/loss", "val/loss", "test/loss", "test/accuracy"):
        assert resumed[key] == uninterrupted[key], key
    for (name, a), b in zip(
        whole.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_dataloader_is_taken_as_its_dataset_and_batch_size(tmp_path: Path):
    train = TensorDataset(DATA[0].x, DATA[0].y)
    with pytest.warns(UserWarning, match="DataLoader is replaced by its dataset"):
        summary = fit(
            model=net(),
            data=(DataLoader(train, batch_size=50, shuffle=True), DATA[1]),
            overrides=[*QUICK, "max_epochs=1"],
            run_dir=tmp_path / "run",
        )
    assert summary["steps"] == 4  # 200 samples in batches of 50
    assert "test/loss" not in summary  # no test split given


@pytest.mark.parametrize(
    ("model", "data", "overrides", "message"),
    [
        (
            nn.Linear(5, 3),  # the data has 6 features
            DATA,
            [],
            f"model: torch.nn.modules.linear.Linear does not fit the data of "
            f"{Points.__module__}.Points: one sample of shape (1, 6)",
        ),
        (net(), ([torch.zeros(6)] * 8,), [], "data: the train split's items must be (input, "),
        (net(), DATA, ["optim.lr=-1"], "optim.lr: must be > 0, got -1"),
        (net(), DATA, ["model.hidden=3"], "model.hidden: model is handed to fit as an object"),
    ],
)
def test_bad_input_raises_config_error_and_writes_nothing(
    tmp_path, model, data, overrides, message
):
    with warnings.catch_warnings(), pytest.raises(ConfigError) as raised:
        fit(model=model, data=data, overrides=[*QUICK, *overrides], run_dir=tmp_path / "run")
    assert str(raised.value).startswith(message), raised.value
    assert not (tmp_path / "run").exists()
