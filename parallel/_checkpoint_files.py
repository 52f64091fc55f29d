"""The files of a checkpoint directory: finding steps, the integrity manifest, moving bad ones aside.

Orbax commits a step atomically (it writes ``<step>.orbax-checkpoint-tmp...`` and renames it to
``<step>``). After the commit, the ``Checkpointer`` adds ``MANIFEST_NAME``: the size and CRC32 of
every file in the step. A step is trusted only if its manifest exists and every file still matches
it, so a file deleted, truncated or overwritten after the commit is detected before restoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any

import jax

MANIFEST_NAME = "shardax_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
ASIDE_DIR = "invalid"  # torn or corrupt steps are moved here, never deleted
_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class StepDir:
    """One step's directory: committed (``<step>``) or an interrupted save (orbax tmp dir)."""

    step: int
    path: Path
    committed: bool


def scan(directory: Path) -> list[StepDir]:
    """Step directories directly under ``directory``, oldest first (tmp dirs before commits)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if not entry.is_dir():
            continue
        name, committed = entry.name, True
        if TMP_MARKER in name:
            name, committed = name.split(TMP_MARKER)[0], False
        if name.isdigit():
            found.append(StepDir(int(name), entry, committed))
    return sorted(found, key=lambda d: (d.step, d.committed, d.path.name))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(step_dir: Path) -> None:
    """Records the size and CRC32 of every file of a committed step (written atomically)."""
    files = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST_NAME)


def verify(entry: StepDir, contents: bool = True) -> str | None:
    """Returns why ``entry`` cannot be trusted, or None if every file matches its manifest.

    Args:
      entry: the step.
      contents: also compare each file's CRC32 (reads every byte); otherwise only the commit,
        the manifest and the file sizes are checked (no file is read).
    """
    if not entry.committed:
        return f"uncommitted: the save was interrupted (temporary directory {entry.path.name})"
    manifest_path = entry.path / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME}: the save was interrupted before it was verified"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable ({e})"
    for name, (size, crc) in files.items():
        path = entry.path / name
        if not path.is_file():
            return f"file {name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"file {name} is truncated or overwritten: {found} bytes, expected {size}"
        if contents and _crc32(path) != crc:
            return f"file {name} is corrupt: its CRC32 differs from the manifest"
    return None


def size_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def move_aside(entry: StepDir, directory: Path) -> Path:
    """Moves a torn or corrupt step into ``directory/invalid/`` (never deletes it); returns where."""
    aside = directory / ASIDE_DIR
    aside.mkdir(exist_ok=True)
    target, n = aside / entry.path.name, 1
    while target.exists():
        target, n = aside / f"{entry.path.name}.{n}", n + 1
    entry.path.rename(target)
    return target


def layout(tree: Any) -> list[list]:
    """``[path, shape, dtype]`` of every leaf, e.g. ``["0/wte/embedding", [256, 64], "float32"]``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(path, simple=True, separator="/"), list(leaf.shape), str(leaf.dtype)]
            for path, leaf in leaves]


def first_mismatch(saved: list[list], wanted: list[list]) -> str | None:
    """Describes the first leaf whose path or shape differs between checkpoint and target.

    Leaves that another leaf mirrors (parameters, which optimizer moments mirror) are compared
    first, so a different model is reported by the parameter that differs rather than by its
    optimizer state, whatever the state's keys.
    """
    saved_shapes = {path: tuple(shape) for path, shape, _ in saved}
    wanted_paths = set()
    for path, shape, _ in _mirrored_first(wanted):
        wanted_paths.add(path)
        if path not in saved_shapes:
            return f"parameter {path}: the checkpoint has none, the model expects shape {tuple(shape)}"
        if saved_shapes[path] != tuple(shape):
            return (f"parameter {path}: the checkpoint has shape {saved_shapes[path]}, "
                    f"the model expects shape {tuple(shape)}")
    for path, shape, _ in _mirrored_first(saved):
        if path not in wanted_paths:
            return f"parameter {path}: the checkpoint has shape {tuple(shape)}, the model has no such parameter"
    return None


def _mirrored_first(leaves: list[list]) -> list[list]:
    """``leaves`` with the mirrored ones first: a leaf is mirrored when another leaf of its
    shape has a path ending with this one's path below its first entry, as
    ``1/0/mu/dense/kernel`` mirrors ``0/dense/kernel``."""
    by_shape: dict[tuple, list[list[str]]] = {}
    for path, shape, _ in leaves:
        by_shape.setdefault(tuple(shape), []).append(path.split("/"))

    def mirrored(leaf) -> bool:
        parts = leaf[0].split("/")
        tail = parts[1:]
        return bool(tail) and any(len(other) > len(tail) and other[-len(tail):] == tail
                                  and other != parts for other in by_shape[tuple(leaf[1])])

    return sorted(leaves, key=lambda leaf: not mirrored(leaf))
