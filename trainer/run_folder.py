"""Run folders: one per run, held by one job at a time, and the run's config recorded once.

- `new_run_folder` names the default folder (`outputs/<date>/<time>-<id>`) so that two runs never
  share one unless the second resumes the first: a plain run creates it exclusively, with a random
  id; under torchrun every rank, and every restarted attempt, derives the same name from what the
  job shares (the agent's start time and the rendezvous id).
- `hold` takes a lock on the folder for the life of a job (rank 0), so that a second job on it is
  refused instead of mixing its checkpoints and metrics into the first one's.
- `refuse_other_run` keeps a command that does not resume a folder's run out of it.
- `record_command` and `record_config` write Hydra's record of the command (.hydra/) and the
  resolved config (config.yaml) once the run is known to start; a later command keeps them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError

log = logging.getLogger("hooktrain")

CONFIG = "config.yaml"  # written once a run starts: its presence marks a folder as a run's
LOCK = "hooktrain.lock"


# ----------------------------------------------------------------------------- naming
def new_run_folder(root: str) -> str:
    """The default run folder under `root` (Hydra's `${run_folder:outputs}`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return str(_torchrun_folder(Path(root)))
    while True:
        now = datetime.now()
        folder = Path(root, f"{now:%Y-%m-%d}", f"{now:%H-%M-%S}-{secrets.token_hex(3)}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()  # exclusive: a name another run took is drawn again
        except FileExistsError:
            continue
        return str(folder)


def _torchrun_folder(root: Path) -> Path:
    """The same folder for every rank of a torchrun job and for its restarted attempts.

    Ranks start at different moments, so the time in the name is the torchrun agent's start
    (their parent process, shared on one node), and the id the rendezvous id (`--standalone`
    draws a fresh UUID; "none" without `--rdzv-id`, when the agent's process id stands in).
    Agents on several nodes start at different times: there only the rendezvous id is shared.
    """
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    job = re.sub(r"[^A-Za-z0-9]+", "-", run_id) if run_id != "none" else f"p{os.getppid()}"
    started = _parent_started()
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 or started is None:
        return root / job
    name = f"{started:%H-%M-%S}-{job[:8]}"
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # A restarted attempt continues in its job's folder even if the clock was set since.
        earlier = sorted(root.glob(f"*/*-{job[:8]}"))
        if earlier:
            return earlier[-1]
    return root / f"{started:%Y-%m-%d}" / name


def _parent_started() -> datetime | None:
    """When this process's parent started (Linux: /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


# ----------------------------------------------------------------------------- one job a folder
@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this job; ConfigError if another live job holds it.

    An flock on `hooktrain.lock`, released by the kernel when the holder dies however it dies,
    so a lock left by a dead process is simply taken; the file names the holder (host and pid)
    for the message a refused job prints, and is emptied on a clean release.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = lock.read().strip() or "starting"
            raise ConfigError(
                f"hydra.run.dir: {run_dir} is in use by another job ({holder}); wait for it to "
                "end, or choose another folder"
            ) from None
        except OSError as err:  # a filesystem without locks (some NFS mounts)
            log.warning(
                "%s: cannot be locked (%s); a second job would not be refused", run_dir, err
            )
            locked = False
        if not locked:
            yield
            return
        if holder := lock.read().strip():
            log.warning(
                "%s: taking over the lock of %s, which ended without releasing it", run_dir, holder
            )
        _rewrite(lock, f"host {socket.gethostname()} pid {os.getpid()}\n")
        try:
            yield
        finally:
            _rewrite(lock, "")
            fcntl.flock(lock, fcntl.LOCK_UN)


def _rewrite(file: Any, text: str) -> None:
    file.seek(0)
    file.truncate()
    file.write(text)
    file.flush()


def refuse_other_run(run_dir: Path, resume: str | None) -> None:
    """A folder that holds a run (its config.yaml) takes only a resume of that run."""
    if not (run_dir / CONFIG).exists():
        return
    if resume == "auto" or (resume and Path(resume).resolve().is_relative_to(run_dir.resolve())):
        return
    raise ConfigError(
        f"hydra.run.dir: {run_dir} already holds a run (see its {CONFIG}); continue it with "
        "resume=auto, or choose another folder"
    )


def holds_nothing_yet(run_dir: Path) -> bool:
    """Whether the folder holds nothing but the job's own log files (Hydra opens them as the
    job starts): a folder made for this command, which a refused command may take away."""
    return run_dir.is_dir() and all(_is_job_log(p) for p in run_dir.iterdir())


def discard(run_dir: Path) -> None:
    """Take away what a refused command wrote in a folder that held nothing before it: a
    config or checkpoint error leaves no run folder behind."""
    for path in run_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if run_dir.resolve() != Path.cwd().resolve():
        with contextlib.suppress(OSError):  # another rank's log file, written meanwhile
            run_dir.rmdir()


def _is_job_log(path: Path) -> bool:
    return path.is_file() and path.name.startswith("hooktrain_rank") and path.suffix == ".log"


# ----------------------------------------------------------------------------- the run's record
def record_command(run_dir: Path, task_cfg: DictConfig) -> None:
    """Hydra's record of the command that started the run: .hydra/ with the composed config,
    Hydra's own and the overrides, as Hydra writes them. recipes/train.yaml turns Hydra's own
    writing off (`hydra.output_subdir: null`): it would rewrite them for every later command in
    the folder, a refused one included, before hooktrain could look at the folder."""
    record = run_dir / ".hydra"
    if record.exists():
        return
    hydra_cfg = HydraConfig.get()
    record.mkdir()
    (record / "config.yaml").write_text(OmegaConf.to_yaml(task_cfg))
    (record / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_cfg}))
    (record / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))


def record_config(run_dir: Path, resolved: dict[str, Any]) -> Path | None:
    """Write the resolved config as config.yaml, once the run is known to start.

    A resume keeps the first attempt's config.yaml: it is the run's record. Where the resuming
    command's config differs (other than `resume`, e.g. a longer max_steps), it is written beside
    it as config_resume_<N>.yaml, so every config that trained in the folder stays on record.
    Returns the file written, or None.
    """
    first = run_dir / CONFIG
    if not first.exists():
        first.write_text(OmegaConf.to_yaml(resolved))
        return first
    resumes = sorted(run_dir.glob("config_resume_*.yaml"), key=_resume_number)
    latest = OmegaConf.to_container(OmegaConf.load(resumes[-1] if resumes else first))
    if _besides_resume(latest) == _besides_resume(resolved):
        return None
    path = run_dir / f"config_resume_{len(resumes) + 1}.yaml"
    path.write_text(OmegaConf.to_yaml(resolved))
    return path


def _resume_number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _besides_resume(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "resume"}
