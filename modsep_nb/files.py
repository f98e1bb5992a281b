"""Atomic writes: every artifact is written under a temporary name in its folder and renamed into place,
so a run killed at any point never leaves a half-written file that looks valid."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(target):
    """Write a folder under a temporary name, then rename it into place; nothing half-written remains."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cache_dir(sub: str | None = None) -> Path:
    """Where models converted or trained by the project, statistics and splits live: $MODSEP_CACHE or
    ~/.cache/modsep (a sub-folder when `sub` is given)."""
    root = Path(os.environ.get("MODSEP_CACHE") or Path.home() / ".cache" / "modsep")
    if sub:
        root = root / sub
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(path, compute, *, load, save, what: str = "result"):
    """The one cache: `load(path)` if that works, else `compute()`, saved atomically with `save(value, tmp)`.
    A file that cannot be loaded (truncated, corrupted, made with other settings: `load` raises) is never
    used: it is recomputed with a warning that says why."""
    path = Path(path)
    if path.is_file():
        try:
            return load(path)
        except Exception as err:
            why = str(err) if isinstance(err, LookupError) else f"unreadable ({type(err).__name__}: {err})"
            warnings.warn(f"cached {what} {path}: {why}; recomputing")
    value = compute()
    with atomic_file(path) as tmp:
        save(value, tmp)
    return value


def write_text_atomic(path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
