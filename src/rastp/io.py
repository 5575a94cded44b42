"""Atomic outputs: a stage that fails leaves nothing behind that DVC (or a user) could mistake for a result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the problem."""


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it into place only if the block succeeds.

    If the block fails, the folders made here to hold `path` are removed again where they are still empty, so that a
    stage stopped by bad input leaves no empty output folders either.
    """
    path = Path(path)
    made_folders = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = tmp if directory else tmp / path.name
    if directory:  # mkdtemp makes 0700; give the output the permissions of an ordinary new folder
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    moved = False
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(target, path)
        moved = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not moved:
            remove_empty_folders(made_folders)


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty; stop at the first that holds something."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: another output lives there
            return


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_npy(path: str | Path) -> np.ndarray:
    """A stage's array input, or a DataError that names the file."""
    path = Path(path)
    try:
        return np.load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as err:  # truncated, not .npy, or pickled objects
        raise DataError(f"{path}: not a readable .npy array ({err})") from None


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
