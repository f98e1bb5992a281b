"""Atomic writes: every artifact is written under a temporary name in its folder and renamed into place,
so a run killed at any point never leaves a half-written file that looks valid.

Cache folders (the converted LM, the trained ViT) are built by `cached_dir`: under a file lock (so
concurrent first builds do not collide), into a temporary folder that is renamed into place, with a
manifest of every file's size and SHA-256 that is verified on each load; a folder that differs is rebuilt
with a warning. Files are created with the permissions the umask allows, like any other file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from filelock import FileLock

MANIFEST = "modsep_manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def respect_umask(path, mode: int) -> None:
    # mkstemp/mkdtemp create 0600/0700 whatever the umask; artifacts get the permissions of a normal file
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    respect_umask(tmp, 0o666)
    try:
        yield Path(tmp)
        respect_umask(tmp, 0o666)     # again: some writers replace the file with a 0600 one (safetensors 0.8)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_LOCKS: dict[str, FileLock] = {}


def dir_lock(target) -> FileLock:
    """The lock that every builder of the folder `target` holds (a file beside it). One object per path,
    so that holding it again in the same process is re-entrant rather than a deadlock."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = str(target.parent / f".{target.name}.lock")
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(path)
    return _LOCKS[path]


@contextlib.contextmanager
def atomic_dir(target):
    """Write a folder under a temporary name, then rename it into place; nothing half-written remains.
    Holds the folder's lock throughout, so concurrent builders take turns; a folder being replaced is
    first renamed aside, so `target` is always either the old complete folder or the new one."""
    target = Path(target)
    with dir_lock(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        respect_umask(tmp, 0o777)
        old = None
        try:
            yield tmp
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "x")
            os.replace(tmp, target)
        finally:
            for leftover in (tmp, old):
                if leftover is not None and leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)


def write_manifest(folder) -> None:
    """Record the size and SHA-256 of every file in `folder` (verified by `check_manifest`)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _file_record(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1), encoding="utf-8")


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


_VERIFIED: dict[str, tuple] = {}   # folder -> (size, mtime) of its files when last verified in this process


def check_manifest(folder) -> str | None:
    """None when `folder` holds exactly the files its manifest records, with their sizes and hashes; else
    what differs. Verified once per process while no file changes (the hash of a 0.5 GB model takes ~1 s)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "it does not exist"
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its checksum file {MANIFEST} is missing or unreadable"
    present = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in present)
    if _VERIFIED.get(str(folder)) == stamp:
        return None
    names = {p.relative_to(folder).as_posix(): p for p in present}
    if set(names) != set(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        return f"files differ from its checksum file (missing {missing}, unexpected {extra})"
    for name, path in names.items():
        if path.stat().st_size != expected[name]["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected[name]['size']} expected"
    for name, path in names.items():
        if _file_record(path)["sha256"] != expected[name]["sha256"]:
            return f"{name} does not match its recorded SHA-256 (corrupted)"
    _VERIFIED[str(folder)] = stamp
    return None


def remove_stale_temporaries(target) -> None:
    """Temporary folders of `target` left by a killed builder (call while holding its lock)."""
    target = Path(target)
    for p in target.parent.glob(f".{target.name}.*"):    # .tmp-*, .old-*, and older code's .<random>
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def cached_dir(target, build, *, what: str) -> Path:
    """`target` if its manifest verifies; else build(tmp) fills a temporary folder that, with its manifest,
    replaces `target` (with a warning when an existing folder differed). Concurrent callers build once."""
    target = Path(target)
    if check_manifest(target) is None:
        return target
    with dir_lock(target):
        problem = check_manifest(target)
        if problem is None:          # another process built it while we waited
            return target
        remove_stale_temporaries(target)
        if target.exists():
            warnings.warn(f"the cached {what} at {target} is not valid ({problem}); rebuilding it")
        with atomic_dir(target) as tmp:   # re-entrant: the same process already holds the lock
            build(Path(tmp))
            write_manifest(tmp)
            for p in Path(tmp).rglob("*"):
                respect_umask(p, 0o777 if p.is_dir() else 0o666)
    return target


def cache_root() -> Path:
    """$MODSEP_CACHE or ~/.cache/modsep (cache_dir without creating it)."""
    return Path(os.environ.get("MODSEP_CACHE") or Path.home() / ".cache" / "modsep")


def cache_dir(sub: str | None = None) -> Path:
    """Where models converted or trained by the project, statistics and splits live: $MODSEP_CACHE or
    ~/.cache/modsep (a sub-folder when `sub` is given)."""
    root = cache_root()
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
    """Always UTF-8: the findings hold "−" and "≥", which an ASCII or Latin-1 locale cannot encode."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_name(name: str) -> str:
    """The part of a file name that stands for `name` (a task): the name itself when it is only ASCII letters,
    digits, - and _; else those characters (others as _) and, after a ".", a hash of the name, so that no two
    names share a file ("x y" and "x_y", or "a/b" and "a:b"). tasks.json records each task's file name."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,80}", name):
        return name
    plain = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:60]
    return f"{plain}.{hashlib.sha256(name.encode('utf-8')).hexdigest()[:10]}"
