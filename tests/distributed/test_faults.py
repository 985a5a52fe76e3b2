"""Fault injection, for real: what each fault does to a run, asserted exactly.

Every fault here really happens -- a SIGKILL from the process to itself under the real `torchrun`
command line with `--max-restarts`, real SIGTERM/SIGUSR1 signals, an exception on one rank,
checkpoint files damaged on disk, a full disk (RLIMIT_FSIZE, so writes fail with EFBIG), a
logging backend raising `OSError`, bad command lines -- and the outcome is checked against an
uninterrupted run: bit-identical weights and losses where the trainer promises an exact resume,
the exit code and the message where it promises an error, a wall-clock bound where it promises
to be prompt.

Each test adds a row to the fault table (tests/faults.py); with HOOKTRAIN_FAULT_TABLE=<path> set,
the session ends by writing it there (that is how docs/faults.md is made).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import cli_env, run_cli
from omegaconf import OmegaConf
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the checkout, for tests.faults / tests.helpers

import trainer.checkpoint as checkpoint_module  # noqa: E402
from tests.faults import WeightWatch, read_jsonl, snapshot  # noqa: E402
from tests.helpers import ADAMW, make_config, make_trainer  # noqa: E402
from trainer.checkpoint import MANIFEST, TRAINER_STATE, CheckpointError, verify  # noqa: E402
from trainer.cli import _launched_job  # noqa: E402
from trainer.config import ParallelConfig  # noqa: E402
from trainer.distributed.env import distributed  # noqa: E402
from trainer.distributed.launch import launch  # noqa: E402

ALLOW_TESTS = "allowed_targets=[trainer.,torch.optim.,torch.nn.,tests.]"
MAX_STEPS = 16
EVERY = 4
# One process: 410 training samples / 16 = 25 steps per epoch. Two ranks: 12 steps per epoch, so
# the 16 steps cross an epoch boundary (validation, sampler epoch) after a mid-epoch resume.
TINY = [
    "data=synthetic",
    "data.dataset.num_samples=512",
    "data.batch_size=16",
    "model=mlp",
    "model.hidden=[32]",
    "logger=[jsonl]",
    "callbacks=none",
    f"max_steps={MAX_STEPS}",
    "log_every_steps=1",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.keep_last=3",
    ALLOW_TESTS,
]


def tiny(**changes: str | None) -> list[str]:
    """TINY with `key=value` entries replaced (dots in keys spelled as double underscores) or,
    for a value of None, dropped."""
    changes = {k.replace("__", "."): v for k, v in changes.items()}
    args = []
    for arg in TINY:
        key = arg.split("=", 1)[0]
        if key not in changes:
            args.append(arg)
        elif changes[key] is not None:
            args.append(f"{key}={changes.pop(key)}")
    return args + [f"{k}={v}" for k, v in changes.items() if v is not None]


# ------------------------------------------------------------------------------- fixtures


def _cli_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted single-process run every single-process fault is compared with."""
    cwd = tmp_path_factory.mktemp("reference")
    out = cwd / "run"
    _cli_ok(run_cli([*TINY, f"hydra.run.dir={out}"], cwd=cwd, timeout=240))
    return out


# ------------------------------------------------------------------------------- helpers


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def checkpoint_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def dcp_state(folder: Path, scratch: Path) -> dict[str, Any]:
    """A checkpoint folder's model and optimizer state, through DCP's own converter."""
    target = scratch / f"{folder.parent.parent.name}_{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=True)


def assert_equal_tree(got: Any, want: Any, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), f"{where} differs"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_equal_tree(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_equal_tree(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def train_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every train/loss written to metrics.jsonl, by step (a replayed step appears twice)."""
    losses: dict[int, list[float]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if "train/loss" in row:
            losses.setdefault(row["step"], []).append(row["train/loss"])
    return losses


def torchrun(
    cwd: Path, args: list[str], *, max_restarts: int = 0, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], float]:
    """The real `torchrun --standalone --nproc_per_node=2 -m trainer *args`: (proc, seconds)."""
    # Plain torchrun, restarts included: on one node hooktrain keeps each attempt's keys apart
    # in the agent's shared rendezvous store (trainer/distributed/env.py).
    env = cli_env()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={max_restarts}", "-m", "trainer", *args,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc, time.monotonic() - started


# ================================================================== 1. SIGKILL + torchrun restart

KILL_STEP = 10


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigkill_one_rank_torchrun_restarts_and_resumes_exactly(tmp_path, record_fault):
    common = ["parallel=ddp", "resume=auto", *TINY]
    record = tmp_path / "fit_start.jsonl"
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    killed, killed_s = torchrun(
        tmp_path,
        [
            *common,
            f"hydra.run.dir={killed_dir}",
            "+callbacks.kill._target_=tests.faults.KillOnce",
            f"+callbacks.kill.step={KILL_STEP}",
            "+callbacks.kill.rank=1",
            f"+callbacks.kill.record={record}",
        ],
        max_restarts=1,
    )
    assert killed.returncode == 0, killed.stderr[-5000:]
    # The agent saw rank 1 die of SIGKILL, and restarted the group once.
    assert "exitcode: -9" in killed.stderr and "local_rank: 1" in killed.stderr
    starts = read_jsonl(record)
    assert sorted((r["restart"], r["rank"], r["start_step"]) for r in starts) == [
        ("0", 0, 0),
        ("0", 1, 0),
        ("1", 0, 8),  # both ranks resumed from the newest complete checkpoint before step 10
        ("1", 1, 8),
    ]

    straight, _ = torchrun(tmp_path, [*common, f"hydra.run.dir={straight_dir}"], max_restarts=1)
    _cli_ok(straight)

    for run_dir in (killed_dir, straight_dir):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == MAX_STEPS and summary["world_size"] == 2
    # Per-step losses: equal everywhere, each step logged once: the restarted attempt dropped
    # the rows the first wrote after its checkpoint (step 9) and logged step 9 again,
    # identically.
    killed_losses, straight_losses = train_losses(killed_dir), train_losses(straight_dir)
    assert sorted(killed_losses) == list(range(1, MAX_STEPS + 1))
    assert [s for s, v in killed_losses.items() if len(v) > 1] == []
    for step, values in killed_losses.items():
        assert values == [straight_losses[step][0]] * len(values), f"step {step}"
    # Final weights and optimizer state, bit for bit.
    got = dcp_state(step_dir(killed_dir, MAX_STEPS), tmp_path)
    want = dcp_state(step_dir(straight_dir, MAX_STEPS), tmp_path)
    assert_equal_tree(got, want)
    record_fault(
        "SIGKILL of one rank mid-run (torchrun --max-restarts=1)",
        f"callback `KillOnce`: `os.kill(os.getpid(), SIGKILL)` on rank 1 after step {KILL_STEP}, "
        "first attempt only; real `torchrun --standalone --nproc_per_node=2 -m trainer "
        f"parallel=ddp resume=auto checkpoint.every_steps={EVERY}`",
        f"agent reported exitcode -9 and restarted both ranks; both resumed at step 8 (newest "
        f"complete checkpoint), finished {MAX_STEPS} steps, exit 0 in {killed_s:.0f} s; losses "
        f"of all {MAX_STEPS} steps (each logged once) and final weights + optimizer "
        "state bit-identical to an uninterrupted run",
    )


def test_restart_launchers_disable_the_shared_store():
    """The multi-node launch scripts that restart workers (--max-restarts) switch torch's shared
    rendezvous TCPStore off: on several nodes the attempts cannot be told apart in it (torch's
    agent restarts healthy workers without counting), and hooktrain refuses such restarts
    without the switch."""
    setting = re.compile(
        r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=(1\b|\$\{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1\})"
    )
    for script in ("launch/multinode.sh", "launch/slurm.sbatch"):
        text = (REPO_ROOT / script).read_text()
        assert "--max-restarts" in text, script
        assert setting.search(text), f"{script}: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


# ================================================================== 2. SIGTERM and SIGUSR1

SIGNAL_STEP = 6


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sigterm_stops_at_step_boundary_then_resumes_exactly(tmp_path, reference_run, record_fault):
    out = tmp_path / "run"
    stopped = run_cli(
        [
            *TINY,
            f"hydra.run.dir={out}",
            "+callbacks.term._target_=tests.faults.SendSignal",
            "+callbacks.term.signal=SIGTERM",
            f"+callbacks.term.step={SIGNAL_STEP}",
        ],
        cwd=tmp_path,
        timeout=240,
    )
    _cli_ok(stopped)
    summary = json.loads((out / "summary.json").read_text())
    # The signal arrived during step 6: that step finished, then the run saved and stopped.
    assert summary["steps"] == SIGNAL_STEP
    assert "SIGTERM" in summary["stop_reason"]
    assert not any(k.startswith("test/") for k in summary)  # preempted: no test pass
    assert checkpoint_folders(out) == [f"step_{EVERY:08d}", f"step_{SIGNAL_STEP:08d}"]
    manifest = verify(step_dir(out, SIGNAL_STEP))
    assert manifest["step"] == SIGNAL_STEP
    saved = torch.load(step_dir(out, SIGNAL_STEP) / TRAINER_STATE, weights_only=True)
    assert saved["state"]["step"] == SIGNAL_STEP

    resumed = run_cli([*TINY, f"hydra.run.dir={out}", "resume=auto"], cwd=tmp_path, timeout=240)
    _cli_ok(resumed)
    assert json.loads((out / "summary.json").read_text())["steps"] == MAX_STEPS
    got = dcp_state(step_dir(out, MAX_STEPS), tmp_path)
    want = dcp_state(step_dir(reference_run, MAX_STEPS), tmp_path)
    assert_equal_tree(got, want)
    losses, reference = train_losses(out), train_losses(reference_run)
    assert {s: v[-1] for s, v in losses.items()} == {s: v[0] for s, v in reference.items()}
    record_fault(
        "SIGTERM (preemption notice), one process",
        f"callback `SendSignal`: `os.kill(os.getpid(), SIGTERM)` at the start of step "
        f"{SIGNAL_STEP}; `hooktrain` CLI",
        f"step {SIGNAL_STEP} completed, run stopped there with exit 0, stop_reason "
        f"{summary['stop_reason']!r}, complete checkpoint step_{SIGNAL_STEP:08d}; a `resume=auto` "
        f"run reached step {MAX_STEPS} with losses and weights bit-identical to an "
        "uninterrupted run",
    )


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_sigusr1_on_rank0_only_stops_both_ranks_with_a_complete_checkpoint(tmp_path, record_fault):
    cfg = make_config(
        parallel=ParallelConfig(strategy="ddp", backend="gloo", timeout_s=20),
        callbacks={
            "usr1": {
                "_target_": "tests.faults.SendSignal",
                "signal": "SIGUSR1",
                "step": 5,
                "rank": 0,
            }
        },
        logger={"jsonl": {"_target_": "trainer.loggers.jsonl.JsonlLogger"}},
        allowed_targets=["trainer.", "torch.optim.", "torch.nn.", "tests."],
        checkpoint={"every_steps": EVERY, "save_final": True},
        max_steps=12,
        test_after_fit=True,
    )
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    started = time.monotonic()
    # The CLI's own multi-process path (`hooktrain parallel.nproc_per_node=2`): run() per rank.
    summaries = launch(_launched_job, 2, container, str(tmp_path), time.time())
    seconds = time.monotonic() - started
    # Rank 0's flag goes out in step 5's all-reduce (every step logs here), which the ranks
    # read during step 6: both stop after step 6.
    assert [summaries[r]["steps"] for r in (0, 1)] == [6, 6]
    assert "SIGUSR1" in summaries[0]["stop_reason"]
    assert summaries[1]["stop_reason"]  # rank 1 stopped on rank 0's request
    for rank in (0, 1):  # preempted: no test pass on any rank (it is collective)
        assert not any(k.startswith("test/") for k in summaries[rank]), rank
    assert checkpoint_folders(tmp_path) == ["step_00000004", "step_00000006"]
    manifest = verify(step_dir(tmp_path, 6))
    assert manifest["step"] == 6 and manifest["world_size"] == 2
    assert {"rng_rank0.pt", "rng_rank1.pt", TRAINER_STATE} <= set(manifest["files"])
    record_fault(
        "SIGUSR1 on one rank of two",
        "callback `SendSignal`: `os.kill(os.getpid(), SIGUSR1)` on rank 0 only, at the start of "
        "step 5; 2 ranks through `launch` and the CLI's own `run()` (DDP, gloo)",
        f"both ranks stopped after step 6 ({summaries[1]['stop_reason']!r} on rank 1), "
        "checkpoint step_00000006 verified with rng_rank0.pt and rng_rank1.pt in its manifest; "
        f"{seconds:.0f} s",
    )


# ================================================================== 3. exception on one rank


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_exception_on_one_rank_ends_torchrun_job_promptly(tmp_path, record_fault):
    message = "injected failure from the fault tests"
    proc, seconds = torchrun(
        tmp_path,
        [
            "parallel=ddp",
            # rank 0 would train for a long while if it were left waiting
            *tiny(max_steps="100000", checkpoint__every_steps=None),
            f"hydra.run.dir={tmp_path / 'run'}",
            "+callbacks.boom._target_=tests.faults.RaiseOnRank",
            "+callbacks.boom.step=3",
            "+callbacks.boom.rank=1",
            f"+callbacks.boom.message={message}",
        ],
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{message} (rank 1, step 3)" in output
    # torchrun's own failure report names the rank that failed first (not the test's message).
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]
    assert seconds < 60, f"the job took {seconds:.1f}s to end"
    record_fault(
        "exception on one rank (torchrun)",
        "callback `RaiseOnRank`: `RuntimeError` on rank 1 at step 3 of a 100000-step DDP run; "
        "real `torchrun --nproc_per_node=2`",
        f"whole job ended in {seconds:.1f} s with exit code {proc.returncode}; the original "
        "message of rank 1 is in torchrun's output",
    )


# ================================================================== 4. damaged checkpoints


def truncate_distcp(folder: Path) -> Path:
    """truncated a .distcp file to half its size"""
    path = sorted(folder.glob("*.distcp"))[-1]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def flip_byte_in_trainer_state(folder: Path) -> Path:
    """flipped one byte in the middle of trainer_state.pt"""
    path = folder / TRAINER_STATE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def delete_manifest(folder: Path) -> Path:
    """deleted manifest.json"""
    (folder / MANIFEST).unlink()
    return folder / MANIFEST


def empty_folder(folder: Path) -> Path:
    """replaced the folder with an empty folder"""
    shutil.rmtree(folder)
    folder.mkdir()
    return folder


DAMAGE = {
    "truncated_distcp": truncate_distcp,
    "flipped_byte_trainer_state": flip_byte_in_trainer_state,
    "deleted_manifest": delete_manifest,
    "empty_folder": empty_folder,
}
DAMAGED_RUN = {"optim": ADAMW, "model": {"dropout": 0.3}, "max_steps": 12}  # 8 steps/epoch


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage, record_fault):
    ckpt = {"every_steps": EVERY, "keep_last": 3}
    straight = make_trainer(tmp_path / "straight", checkpoint=ckpt, **DAMAGED_RUN)
    straight.fit()
    run_dir = tmp_path / "run"
    make_trainer(run_dir, checkpoint=ckpt, **DAMAGED_RUN).fit()
    assert checkpoint_folders(run_dir) == ["step_00000004", "step_00000008", "step_00000012"]
    culprit = DAMAGE[damage](step_dir(run_dir, 12))

    watch = WeightWatch()
    resumed = make_trainer(
        run_dir, checkpoint=ckpt, resume="auto", callbacks=[watch], **DAMAGED_RUN
    )
    with pytest.warns(RuntimeWarning, match=re.escape(str(culprit))) as caught:
        resumed.fit()
    assert watch.start_step == 8  # the previous complete checkpoint
    assert resumed.state.step == 12
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    verify(step_dir(run_dir, 12))  # rewritten, complete again
    warning = next(str(w.message) for w in caught if str(culprit) in str(w.message))
    record_fault(
        f"damaged newest checkpoint: {damage.replace('_', ' ')}",
        f"{DAMAGE[damage].__doc__} on step_00000012 of a keep_last=3 run "
        "(checkpoints 4, 8, 12), then `resume=auto`",
        f"RuntimeWarning {warning.replace(str(tmp_path), '<tmp>')!r}; resumed from step 8 and "
        "ended at step 12 with weights bit-identical to the uninterrupted run",
    )


def _damaged_two_rank_worker(run_dir: str, only_rank_one_sees_it: bool) -> dict[str, Any]:
    cfg = make_config(
        parallel=ParallelConfig(strategy="ddp", backend="gloo", timeout_s=60),
        checkpoint={"every_steps": EVERY, "keep_last": 3},
        **DAMAGED_RUN,
    )
    from trainer.build import build_trainer

    with distributed("cpu", "gloo", 60) as env:
        first, _ = build_trainer(cfg, env, Path(run_dir))
        first.fit()
        uninterrupted = snapshot(first.model)
        dist.barrier()
        culprit = None
        if only_rank_one_sees_it:
            # Rank 1 alone finds step 12 damaged (as a rank on a node with a bad disk cache
            # would); rank 0 would take it. Both must still resume from the same step.
            culprit = str(step_dir(Path(run_dir), 12) / MANIFEST)
            if env.rank == 1:
                real_verify = checkpoint_module.verify

                def flaky_verify(folder: Path) -> dict[str, Any]:
                    if folder.name == "step_00000012":
                        raise CheckpointError(f"{culprit}: checksum mismatch (simulated)")
                    return real_verify(folder)

                checkpoint_module.verify = flaky_verify
        elif env.rank == 0:  # rank 1's shard of the newest checkpoint, cut in half
            culprit = str(truncate_distcp(step_dir(Path(run_dir), 12)))
        dist.barrier()
        cfg.resume = "auto"
        second, _ = build_trainer(cfg, env, Path(run_dir))
        watch = WeightWatch()
        second.callbacks.append(watch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            second.fit()
        return {
            "culprit": culprit,
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
            "start_step": watch.start_step,
            "end_step": second.state.step,
            "uninterrupted": uninterrupted,
            "resumed": snapshot(second.model),
        }


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("only_rank_one_sees_it", [False, True], ids=["shared", "rank1_only"])
def test_damaged_checkpoint_two_ranks_fall_back_to_the_same_step(
    tmp_path, record_fault, only_rank_one_sees_it
):
    results = launch(_damaged_two_rank_worker, 2, str(tmp_path), only_rank_one_sees_it)
    culprit = results[0]["culprit"] or results[1]["culprit"]  # set by the rank that damaged
    assert culprit.endswith(MANIFEST if only_rank_one_sees_it else ".distcp")
    for rank in (0, 1):
        got = results[rank]
        warned = any(culprit in w and "checksum mismatch" in w for w in got["warnings"])
        assert warned == (rank == 1 or not only_rank_one_sees_it), rank
        assert (got["start_step"], got["end_step"]) == (8, 12), rank
        for name, value in got["uninterrupted"].items():
            assert torch.equal(got["resumed"][name], value), (rank, name)
            assert torch.equal(results[0]["resumed"][name], got["resumed"][name]), name
    if only_rank_one_sees_it:
        record_fault(
            "newest checkpoint unreadable on one rank only, 2 ranks",
            "rank 1's checksum check of step_00000012 fails, rank 0's passes (DDP over gloo, 2 "
            "ranks via `launch`), then `resume=auto` on both ranks",
            "rank 1 warned naming the file; both ranks agreed on the older step 8, reached step "
            "12 with weights bit-identical across ranks and to the uninterrupted run",
        )
        return
    record_fault(
        "damaged newest checkpoint, 2 ranks",
        f"truncated `{Path(culprit).name}` of step_00000012 (DDP over gloo, 2 ranks via "
        "`launch`), then `resume=auto` on both ranks",
        "each rank warned naming the file; both resumed from step 8, reached step 12 with "
        "weights bit-identical across ranks and to the uninterrupted run",
    )


# ================================================================== 5. disk full while saving

DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.helpers import make_trainer
    from trainer.callbacks.base import Callback
    from trainer.checkpoint import verify

    class FillDisk(Callback):
        \"\"\"From step 3 on, no file may grow past a limit that the small checkpoint files (rng,
        trainer state, DCP metadata, manifest) stay under and the .distcp data file exceeds.\"\"\"

        def on_step_start(self, state):
            if state.step + 1 != 3:
                return
            self.trainer.checkpointer.finish_pending()  # step 2 on disk first (async_save)
            sizes = {{p.name: p.stat().st_size for p in STEP2.iterdir()}}
            data = min(v for k, v in sizes.items() if k.endswith(".distcp"))
            small = max(v for k, v in sizes.items() if not k.endswith(".distcp"))
            assert small < data, sizes
            self.limit = (small + data) // 2
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write returns EFBIG
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, hard))

    run_dir = Path(sys.argv[1])
    STEP2 = run_dir / "checkpoints" / "step_00000002"
    ckpt = {{"every_steps": 2, "keep_last": 3, "async_save": {async_save}}}
    fill = FillDisk()
    trainer = make_trainer(run_dir, max_steps=8, checkpoint=ckpt, callbacks=[fill])
    fill.trainer = trainer
    result = {{}}
    try:
        trainer.fit()
    except BaseException as err:  # report whatever escapes, CheckpointError or not
        result.update(type=type(err).__name__, message=str(err))
    result["limit"] = getattr(fill, "limit", None)
    result["step"] = trainer.state.step
    result["folders"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    try:
        result["verified_step"] = verify(STEP2)["step"]
    except Exception as err:
        result["verified_step"] = repr(err)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async_save"])
def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, async_save, record_fault):
    script = DISK_FULL_SCRIPT.format(repo=str(REPO_ROOT), async_save=async_save)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    partial = tmp_path / "run" / "checkpoints" / "step_00000004.partial"
    assert result.get("type") == "CheckpointError", result
    assert str(partial) in result["message"]
    assert "step 2 is intact" in result["message"]
    assert "File too large" in result["message"]
    # A synchronous save fails at once; a background one when it is committed, at the next save.
    assert result["step"] == (6 if async_save else 4)
    assert result["folders"] == ["step_00000002"]  # no .partial left behind
    assert result["verified_step"] == 2
    # The message without DCP's traceback: "<folder>: saving ... failed (<cause>); <verdict>".
    message = result["message"].replace(str(tmp_path), "<tmp>")
    cause = next(x.strip() for x in message.splitlines() if "File too large" in x)
    short = f"{message.split(' (', 1)[0]} ({cause}){message.rsplit(')', 1)[-1].rstrip()}"
    mode = "checkpoint.async_save=true" if async_save else "a synchronous save"
    record_fault(
        f"disk full while saving ({mode})",
        f"subprocess: `setrlimit(RLIMIT_FSIZE, {result['limit']})` (SIGXFSZ ignored) after the "
        "step-2 checkpoint: the step-4 .distcp write fails with EFBIG",
        f"{result['type']} at step {result['step']}: {short!r}; step_00000002 still verifies, "
        "no .partial folder left",
    )


# ================================================================== 7. bad input through the CLI


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_input_exit_codes_and_messages(tmp_path, reference_run, record_fault):
    missing = run_cli(["resume=/nonexistent", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert any(
        line.startswith("hooktrain: config error: resume: ") and "/nonexistent" in line
        for line in missing.stderr.splitlines()
    ), missing.stderr[-3000:]

    outsider = run_cli(
        [
            *tiny(allowed_targets=None),
            "+callbacks.evil._target_=os.system",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        cwd=tmp_path,
    )
    assert outsider.returncode == 2, outsider.stderr[-3000:]
    assert "hooktrain: config error: callbacks.evil._target_: 'os.system' is outside" in (
        outsider.stderr
    )
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing ran

    folder = step_dir(reference_run, MAX_STEPS)  # trained with model.hidden=[32]
    wider = run_cli(
        [*tiny(model__hidden="[64]"), f"resume={folder}", f"hydra.run.dir={tmp_path / 'c'}"],
        cwd=tmp_path,
        timeout=240,
    )
    assert wider.returncode == 3, wider.stderr[-3000:]
    (line,) = [x for x in wider.stderr.splitlines() if x.startswith("hooktrain: checkpoint error")]
    assert str(folder) in line and "does not fit" in line

    # Step 16 is mid-epoch (25 steps per epoch): another global batch would move the position.
    bigger = run_cli(
        [*tiny(data__batch_size="32"), f"resume={folder}", f"hydra.run.dir={tmp_path / 'd'}"],
        cwd=tmp_path,
        timeout=240,
    )
    assert bigger.returncode == 3, bigger.stderr[-3000:]
    (moved,) = [
        x for x in bigger.stderr.splitlines() if x.startswith("hooktrain: checkpoint error")
    ]
    assert str(folder) in moved and "global batch of 16 samples" in moved and "is 32" in moved
    record_fault(
        "bad input on the command line",
        "`resume=/nonexistent`; `+callbacks.evil._target_=os.system`; resuming a "
        "model.hidden=[32] checkpoint with model.hidden=[64]; resuming a mid-epoch checkpoint "
        "with data.batch_size=32 instead of 16",
        "exit 2 with a `config error: resume: ...` line; exit 2 naming "
        "`callbacks.evil._target_` (nothing started); exit 3 with a `checkpoint error:` line "
        "naming the checkpoint folder; exit 3 with one line: "
        f"{moved.removeprefix('hooktrain: ').replace(str(folder.parent.parent.parent), '<tmp>')!r}",
    )


# ================================================================== 9. logger outage


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_logger_outage_warns_and_training_goes_on(tmp_path, record_fault):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file where TensorBoard wants its folder")
    proc = run_cli(
        [
            *tiny(logger="none"),
            "+logger.broken._target_=tests.faults.BrokenLogger",  # first: it fails first
            "+logger.tensorboard._target_=trainer.loggers.tensorboard.TensorBoardLogger",
            "+logger.jsonl._target_=trainer.loggers.jsonl.JsonlLogger",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        timeout=240,
    )
    _cli_ok(proc)
    warned = [x for x in proc.stderr.splitlines() if "logger BrokenLogger failed" in x]
    assert len(warned) == 1 and "OSError" in warned[0], proc.stderr[-3000:]
    assert "RuntimeWarning" in warned[0]
    (no_start,) = [x for x in proc.stderr.splitlines() if "logger.tensorboard could not" in x]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, MAX_STEPS + 1))
    assert any("test/accuracy" in r for r in rows)
    assert json.loads((out / "summary.json").read_text())["steps"] == MAX_STEPS
    record_fault(
        "logging backend down",
        "logger `BrokenLogger` (raises `OSError` in `log_metrics`) and the real TensorBoard "
        "logger with a file where its folder goes, both configured before jsonl",
        f"exit 0; one stderr line each: {warned[0].split('RuntimeWarning: ')[-1]!r} and "
        f"{no_start.split('RuntimeWarning: ')[-1].replace(str(tmp_path), '<tmp>')!r}; "
        f"metrics.jsonl has all {MAX_STEPS} train steps and the test metrics",
    )
