"""Run folders (trainer/run_folder.py): names no two runs share, the refusal of a command that
does not continue a folder's run, and config.yaml kept as the run's record across resumes. The
lock between two live jobs, and the folder torchrun's ranks agree on, are tested through the real
command in tests/integration (test_cli.py, test_launch_scripts.py)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer import run_folder
from trainer.config import ConfigError


class _Frozen(datetime):
    """The clock stopped inside one second: what two runs started together see."""

    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5)


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "datetime", _Frozen)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    first, second = (Path(run_folder.new_run_folder(str(tmp_path))) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
    for folder in (first, second):
        assert folder.parent == tmp_path / "2030-01-02"
        assert re.fullmatch(r"03-04-05-[0-9a-f]{6}", folder.name), folder.name
    # The folder is created exclusively: an id that another run drew already is drawn again.
    draws = iter(["c0ffee", "c0ffee", "beefed"])
    monkeypatch.setattr(run_folder.secrets, "token_hex", lambda nbytes: next(draws))
    taken = run_folder.new_run_folder(str(tmp_path))
    assert Path(run_folder.new_run_folder(str(tmp_path))).name == "03-04-05-beefed"
    assert Path(taken).name == "03-04-05-c0ffee"


def test_a_torchrun_restart_finds_its_jobs_folder(tmp_path, monkeypatch):
    run_id = "5f0c2d1e-aaaa-bbbb-cccc-000000000000"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    started = run_folder._parent_started()
    first = Path(run_folder.new_run_folder(str(tmp_path)))
    assert first == tmp_path / f"{started:%Y-%m-%d}" / f"{started:%H-%M-%S}-5f0c2d1e"
    assert Path(run_folder.new_run_folder(str(tmp_path))) == first  # every rank: the same
    # The first attempt's folder, even where the clock has been set since.
    earlier = tmp_path / "2029-12-31" / "23-59-59-5f0c2d1e"
    earlier.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert Path(run_folder.new_run_folder(str(tmp_path))) == earlier
    # Agents on several nodes start at different times: only the rendezvous id is shared.
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert (
        Path(run_folder.new_run_folder(str(tmp_path)))
        == tmp_path / "5f0c2d1e-aaaa-bbbb-cccc-000000000000"
    )


def test_only_a_resume_continues_a_folder_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_folder.refuse_other_run(run_dir, None)  # an empty folder takes any run
    (run_dir / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(
        ConfigError, match=rf"hydra.run.dir: {re.escape(str(run_dir))} already holds a run"
    ):
        run_folder.refuse_other_run(run_dir, None)
    run_folder.refuse_other_run(run_dir, "auto")
    run_folder.refuse_other_run(run_dir, str(run_dir / "checkpoints" / "step_00000004"))
    with pytest.raises(ConfigError):  # another run's checkpoint, continued in this run's folder
        run_folder.refuse_other_run(run_dir, str(tmp_path / "other" / "checkpoints" / "step_1"))


def test_a_resume_keeps_the_first_config_and_records_a_changed_one_beside_it(tmp_path):
    config = {"seed": 0, "max_steps": 10, "resume": None, "model": {"hidden": [32]}}
    assert run_folder.record_config(tmp_path, config) == tmp_path / "config.yaml"
    first = (tmp_path / "config.yaml").read_text()
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")) == config
    # The same run resumed: nothing new to record.
    assert run_folder.record_config(tmp_path, {**config, "resume": "auto"}) is None
    # Resumed for longer: the new config beside the first, once.
    longer = {**config, "max_steps": 20, "resume": "auto"}
    assert run_folder.record_config(tmp_path, longer) == tmp_path / "config_resume_1.yaml"
    assert run_folder.record_config(tmp_path, longer) is None
    assert (
        run_folder.record_config(tmp_path, {**longer, "max_steps": 30}).name
        == "config_resume_2.yaml"
    )
    assert (tmp_path / "config.yaml").read_text() == first
