"""Checkpoints that cannot be trusted: crafted pickles, files missing from the manifest, a kill
while old checkpoints are deleted, a run folder where every checkpoint is damaged, and a run
folder named where a checkpoint was expected.

Every payload here would create a sentinel file if anything unpickled it; the tests assert that
the file never appears and that the checkpoint is refused (resume=<folder>) or skipped
(resume=auto) with a message naming the file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli_env, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from tests.faults import WeightWatch  # noqa: E402
from tests.helpers import ADAMW, make_trainer  # noqa: E402
from trainer.checkpoint import MANIFEST, TRAINER_STATE, CheckpointError, verify  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = {"optim": ADAMW, "max_steps": 4, "checkpoint": {"every_steps": 2, "keep_last": 3}}


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _saved_run(run_dir: Path) -> Path:
    """A run folder with complete checkpoints at steps 2 and 4; returns step 4's folder."""
    make_trainer(run_dir, **RUN).fit()
    assert verify(_step(run_dir, 4))["files"]
    return _step(run_dir, 4)


def _relist(folder: Path, drop: str | None = None) -> None:
    """Rewrite the manifest as an attacker would: every file's checksum as it is now, and
    `drop` left out."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in manifest["files"]
        if name != drop
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this opens (creates) the sentinel file: code run from a checkpoint."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


# ------------------------------------------------------------------------------- payloads


def _pickle_in_metadata(folder: Path, sentinel: Path) -> Path:
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(sentinel)))
    _relist(folder)
    return folder / ".metadata"


def _unlisted_metadata(folder: Path, sentinel: Path) -> Path:
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(sentinel)))
    _relist(folder, drop=".metadata")
    return folder / ".metadata"


def _pickle_in_param_groups(folder: Path, sentinel: Path) -> Path:
    """The optimizer's learning rate, a non-tensor value DCP stores as a torch.save'd pickle,
    replaced by the payload: appended to the data file, the metadata pointed at it."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, made by the save above
    (index,) = [i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr"]
    info = metadata.storage_data[index]
    data_file = folder / info.relative_path
    buffer = io.BytesIO()
    torch.save(_Payload(sentinel), buffer)
    info.offset, info.length = data_file.stat().st_size, len(buffer.getvalue())
    with open(data_file, "ab") as f:
        f.write(buffer.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    _relist(folder)
    return data_file


PAYLOADS = [
    pytest.param(_pickle_in_metadata, id="pickle_in_metadata"),
    pytest.param(_unlisted_metadata, id="metadata_not_in_manifest"),
    pytest.param(_pickle_in_param_groups, id="pickle_in_param_groups"),
]


def test_payloads_are_real(tmp_path):
    """Each crafted checkpoint does run its code through DCP's default reader (which the
    trainer no longer uses): the tests below would catch a payload that ran."""
    for craft in (_pickle_in_metadata, _pickle_in_param_groups):
        folder = _saved_run(tmp_path / craft.__name__)
        sentinel = tmp_path / f"{craft.__name__}.ran"
        craft(folder, sentinel)
        wanted = {"optim": {"param_groups": [{"lr": 0.0}]}}
        with contextlib.suppress(BaseException):  # whatever fails once the payload has run
            torch.distributed.checkpoint.load(wanted, checkpoint_id=folder)
        assert sentinel.exists(), craft.__name__


@pytest.mark.parametrize("resume_mode", ["path", "auto"])
@pytest.mark.parametrize("craft", PAYLOADS)
def test_crafted_checkpoint_never_runs_code(tmp_path, craft, resume_mode):
    folder = _saved_run(tmp_path)
    sentinel = tmp_path / "payload_ran"
    culprit = craft(folder, sentinel)

    watch = WeightWatch()
    resume = str(folder) if resume_mode == "path" else "auto"
    trainer = make_trainer(tmp_path, resume=resume, callbacks=[watch], **RUN)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            trainer.fit()
        except CheckpointError as err:
            error = str(err)
    assert not sentinel.exists(), "the checkpoint ran code"
    if resume_mode == "path":  # refused before training, naming the file
        assert error is not None and error.startswith(str(culprit)), error
        assert watch.start_step is None
    else:  # the crafted step 4 skipped with a warning naming the file
        assert error is None, error
        assert any(str(culprit) in str(w.message) for w in caught)
        assert watch.start_step == 2


# ------------------------------------------------------------------------------- completeness


def _data_file(folder: Path) -> str:
    return next(folder.glob("*.distcp")).name


@pytest.mark.parametrize(
    "name",
    [TRAINER_STATE, ".metadata", "rng_rank0.pt", _data_file],
    ids=lambda n: getattr(n, "__name__", n),
)
def test_a_file_missing_with_its_manifest_entry_is_damage(tmp_path, name):
    folder = _saved_run(tmp_path)
    name = name(folder) if callable(name) else name
    (folder / name).unlink()
    _relist(folder, drop=name)

    with pytest.raises(CheckpointError, match=re.escape(name)):
        verify(folder)
    trainer = make_trainer(tmp_path, resume=str(folder), **RUN)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        trainer.fit()
    watch = WeightWatch()
    trainer = make_trainer(tmp_path, resume="auto", callbacks=[watch], **RUN)
    with pytest.warns(RuntimeWarning, match=re.escape(name)):
        trainer.fit()
    assert watch.start_step == 2


# ------------------------------------------------------------------------------- all damaged


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_every_checkpoint_damaged_stops_resume_auto_and_keeps_them(tmp_path):
    _saved_run(tmp_path)
    for step in (2, 4):
        (_step(tmp_path, step) / TRAINER_STATE).write_bytes(b"damaged")
    before = _tree(tmp_path)

    watch = WeightWatch()
    trainer = make_trainer(tmp_path, resume="auto", callbacks=[watch], **RUN)
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert str(tmp_path / "checkpoints") in message and "no usable checkpoint" in message
    for step in (2, 4):
        assert str(_step(tmp_path, step) / TRAINER_STATE) in message
    assert watch.start_step is None
    assert _tree(tmp_path) == before  # nothing written, nothing deleted


def test_only_leftovers_of_a_crashed_first_save_start_afresh(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002.partial").mkdir(parents=True)
    watch = WeightWatch()
    make_trainer(tmp_path, resume="auto", callbacks=[watch], **RUN).fit()
    assert watch.start_step == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]


# ------------------------------------------------------------------------------- retention

KILL_MID_DELETE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.helpers import make_trainer
    from trainer.callbacks.base import Callback

    class KillWhileDeleting(Callback):
        \"\"\"From step 3's start on, the first file deleted is the last thing this process does:
        the step-3 save commits, then retention deletes step 1 and is killed midway.\"\"\"

        def on_step_start(self, state):
            if state.step + 1 == 3:
                unlink = os.unlink

                def unlink_then_die(*args, **kwargs):
                    unlink(*args, **kwargs)
                    os.kill(os.getpid(), signal.SIGKILL)

                os.unlink = unlink_then_die

    ckpt = {{"every_steps": 1, "keep_last": 2}}
    make_trainer(sys.argv[1], max_steps=5, checkpoint=ckpt, callbacks=[KillWhileDeleting()]).fit()
    """
)


def test_sigkill_while_deleting_never_leaves_a_partial_step_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_DELETE.format(repo=str(REPO_ROOT)), str(tmp_path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert [n for n in names if n.startswith("step_00000001")] == ["step_00000001.deleting"]
    assert len(list((root / "step_00000001.deleting").iterdir())) > 0  # killed midway
    for name in names:
        if re.fullmatch(r"step_\d{8}", name):
            verify(root / name)  # every folder under a final name is complete

    watch = WeightWatch()
    ckpt = {"every_steps": 1, "keep_last": 2}
    make_trainer(tmp_path, max_steps=5, checkpoint=ckpt, resume="auto", callbacks=[watch]).fit()
    assert watch.start_step == 3
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]


# ------------------------------------------------------------------------------- run folders


def test_resume_from_a_run_folder_names_its_checkpoints(tmp_path):
    """In process for both spellings, then once through the CLI: one line, exit 3."""
    run_dir = tmp_path / "run"
    _saved_run(run_dir)
    (_step(run_dir, 4) / TRAINER_STATE).write_bytes(b"damaged")  # not complete any more
    messages = {}
    for given in (run_dir, run_dir / "checkpoints"):
        with pytest.raises(CheckpointError) as caught:
            make_trainer(tmp_path / "other", resume=str(given), **RUN).fit()
        message = messages[given] = str(caught.value)
        assert message.startswith(f"{given}: a run")
        assert "its complete checkpoints are step_00000002:" in message
        assert f"resume=auto hydra.run.dir={run_dir}" in message
        assert f"resume={_step(run_dir, 2)}" in message

    proc = run_cli(
        [
            "model=mlp",
            "data=synthetic",
            "callbacks=none",
            "logger=none",
            f"resume={run_dir}",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("hooktrain:")]
    assert line == f"hooktrain: checkpoint error: {messages[run_dir]}"
