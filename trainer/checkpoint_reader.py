"""Reading a checkpoint folder without trusting it: the manifest, completeness, checksums, and
DCP's pickled parts through an allowlist.

`torch.distributed.checkpoint` (DCP) stores two things as pickles: its `.metadata` file (read by
`FileSystemReader.read_metadata` with a plain `pickle.load`) and every non-tensor value of the
state dict, such as the optimizer's `param_groups` (read by `DefaultLoadPlanner.load_bytes` with
`torch.load(weights_only=False)`). Either runs any code a crafted file carries. Here the metadata
goes through `_MetadataUnpickler`, which builds only DCP's own metadata classes, torch dtypes,
layouts, memory formats and sizes, and paths; the byte values through `torch.load(weights_only=
True)`. Only files the manifest lists are read: the metadata must be listed, and every data file
it points at too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
DCP_METADATA = ".metadata"
COMMITTED = re.compile(r"step_\d{8}")  # a final name; `.partial` and `.deleting` are not


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the model."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def required_files(world_size: int) -> list[str]:
    """The files every checkpoint of `world_size` ranks holds besides DCP's data files (which
    its `.metadata` names)."""
    return [TRAINER_STATE, DCP_METADATA, *(rng_file(r) for r in range(world_size))]


def verify(folder: Path) -> dict[str, Any]:
    """Check the manifest, that it lists every file the checkpoint needs, every file's checksum,
    and that DCP's pickled parts hold nothing outside the allowlist; return the manifest. Raises
    CheckpointError naming the file that is wrong."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, world_size = manifest["files"], manifest["world_size"]
        if not isinstance(files, dict) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError("'files' must be a mapping and 'world_size' a positive integer")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name in files:
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{manifest_path}: lists {name!r}, which is not a file name")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
    metadata = check_complete(folder, set(files), world_size)
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            _load_weights_only(_read_slice(folder / info.relative_path, info), folder, info)
    return manifest


def check_complete(folder: Path, listed: set[str], world_size: int) -> Metadata:
    """That `listed` (the manifest's names) holds every file a checkpoint of `world_size` ranks
    needs: ours, DCP's `.metadata`, and every data file that names; returns the metadata."""
    for name in required_files(world_size):
        if name not in listed:
            raise CheckpointError(
                f"{folder / name}: missing from a checkpoint of {world_size} ranks, so the "
                "checkpoint is incomplete"
            )
    return read_metadata(folder, listed)


def read_metadata(folder: Path, listed: set[str]) -> Metadata:
    """DCP's `.metadata` of `folder`, unpickled through the allowlist, with every data file it
    points at in `listed` (the manifest's names) and every byte range inside its file."""
    path = folder / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as err:  # refused, truncated or junk: pickle raises many kinds
        raise CheckpointError(f"{path}: not DCP metadata hooktrain can read ({err})") from None
    # The allowlist built only DCP's classes, but their fields may hold anything: check the
    # shapes that reading relies on.
    if not (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
        and all(isinstance(index, MetadataIndex) for index in metadata.storage_data)
    ):
        raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointError(f"{path}: holds {info!r} where a file's entry belongs")
        if info.relative_path not in listed:
            raise CheckpointError(
                f"{path}: points at {info.relative_path!r}, a file not in the manifest"
            )
        if (
            info.transform_descriptors
            or not (isinstance(info.offset, int) and isinstance(info.length, int))
            or not 0 <= info.offset <= info.offset + info.length
        ):
            raise CheckpointError(
                f"{path}: an entry of {info.relative_path} hooktrain never writes"
            )
        if info.offset + info.length > (folder / info.relative_path).stat().st_size:
            raise CheckpointError(f"{folder / info.relative_path}: shorter than its metadata says")
    return metadata


def committed(root: Path) -> list[Path]:
    """The folders under `root` with a committed checkpoint's name, oldest step first."""
    return sorted(p for p in root.glob("step_*") if COMMITTED.fullmatch(p.name))


def refuse_run_folder(folder: Path) -> None:
    """`resume=<run folder>` (or its `checkpoints/`) instead of a checkpoint: one line naming
    what it holds and how to resume from it."""
    root = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    steps = committed(root)
    if (folder / MANIFEST).exists() or (root == folder and not steps):
        return  # a checkpoint (or what is left of one): verify says what is wrong with it
    kind = "a run folder" if root != folder else "a run's checkpoints folder"
    complete = []
    for step in reversed(steps):
        with contextlib.suppress(CheckpointError):
            verify(step)
            complete.append(step.name)
    if not complete:
        raise CheckpointError(f"{folder}: {kind}, not a checkpoint, and it holds no complete one")
    raise CheckpointError(
        f"{folder}: {kind}, not a checkpoint; its complete checkpoints are "
        f"{', '.join(complete)}: continue the run with resume=auto hydra.run.dir={root.parent}, "
        f"or resume from one with resume={root / complete[0]}"
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- DCP's reader and planner


class ListedFilesReader(FileSystemReader):
    """DCP's file reader, but the metadata is read through the allowlist and only from files the
    manifest lists. `read_metadata` takes no `rank`, so DCP never falls back to a rank-local
    `__<rank>.metadata` file."""

    def __init__(self, folder: Path, listed: set[str]) -> None:
        super().__init__(folder)
        self.folder, self.listed = folder, listed

    def read_metadata(self) -> Metadata:
        metadata = read_metadata(self.folder, self.listed)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the non-tensor values loaded weights-only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ---------------------------------------------------------------------- pieces


def _read_slice(path: Path, info: _StorageInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def _load_weights_only(data: bytes, folder: Path, info: _StorageInfo) -> Any:
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others on junk
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{folder / info.relative_path}: a stored value that is not plain data ({first})"
        ) from None


# What DCP's `.metadata` pickle is made of: its dataclasses, and the torch and pathlib values they
# hold. Anything else (a function to call, a class to build) is refused before it is touched.
_DCP_CLASSES = (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    _MEM_FORMAT_ENCODING,
    _StorageInfo,
)
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _DCP_CLASSES},
    ("torch", "Size"): torch.Size,
    # torch.layout pickles as a call of this lookup by name (copyreg in torch.serialization)
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # a path saved on Windows, inert here
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.memory_format)):  # pickled by name
            return value
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")
