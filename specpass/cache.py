"""specpass's on-disk cache (converted models, calibrated plans, compiled programs): where, how big, and
``specpass cache`` to report or clear it.

Everything in it can be rebuilt: a cleared entry costs a conversion, a calibration or a compile the next time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from specpass.errors import SpecPassError

#: the cache's folders: what each holds
KINDS = {
    "models": "converted models (specpass.models)",
    "plans": "calibrated SpecPlans, one per model and machine",
    "programs": "compiled AOTInductor programs, shared by every process",
    "kernels": "specpass's C++ kernels (specpass/kernels), built once per machine and torch version",
}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """specpass's cache: ``cache_dir``, else ``$SPECPASS_CACHE``, else ``$XDG_CACHE_HOME/specpass``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SPECPASS_CACHE"):
        return Path(os.environ["SPECPASS_CACHE"]).expanduser()
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "specpass"


def private_dirs(path: Path) -> Path:
    """Create the folder ``path`` and any missing folder above it with mode 0700 (what specpass caches is loaded as
    native code, or steers what is); returns ``path``."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    return path


def check_private(path: Path) -> Path:
    """``path`` if it and every folder above it belong to this user or root and no one else can write to them (a
    folder others may write counts only with the sticky bit, as /tmp), as ssh checks its keys; else a
    SpecPassError naming what is wrong and the fix. Run before loading native code or a plan from the cache:
    whoever can write there could run code in this process."""
    if not hasattr(os, "getuid"):  # pragma: no cover - no POSIX owners (Windows)
        return path
    uid = os.getuid()
    fix = "make it private (chmod 700 DIR; chown it to yourself), or set SPECPASS_CACHE to a private folder"
    target = Path(os.path.realpath(path))
    for p in [target, *target.parents]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid not in (uid, 0):
            raise SpecPassError(
                f"{p} belongs to another user (uid {st.st_uid}); specpass loads code from its cache only where "
                f"nobody else can write: {fix}"
            )
        if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            raise SpecPassError(
                f"{p} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); specpass loads code from "
                f"its cache only where nobody else can write: {fix}"
            )
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one; missing
    folders are created private (``private_dirs``)."""
    private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            files += 1
            total += p.stat().st_size
    return files, total


def report(root: Path | None = None) -> dict:
    """Files and bytes per folder of the cache at ``root`` (default: ``cache_root()``)."""
    root = cache_root() if root is None else root
    kinds = {}
    for kind, what in KINDS.items():
        files, size = _size(root / kind) if (root / kind).is_dir() else (0, 0)
        kinds[kind] = {"files": files, "bytes": size, "holds": what}
    return {"root": str(root), "kinds": kinds, "bytes": sum(k["bytes"] for k in kinds.values())}


def clear(kinds, root: Path | None = None) -> int:
    """Delete the cache's ``kinds`` folders; returns the bytes freed."""
    root = cache_root() if root is None else root
    freed = 0
    for kind in kinds:
        if kind not in KINDS:
            raise SpecPassError(f"unknown cache folder {kind!r}; choose from {', '.join(KINDS)}")
        folder = root / kind
        if not folder.is_dir():
            continue
        freed += _size(folder)[1]
        try:
            shutil.rmtree(folder)
        except OSError as e:
            raise SpecPassError(f"cannot clear {folder}: {e}") from e
    return freed


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument("action", nargs="?", default="info", choices=("info", "clear"), help="(default: info)")
    parser.add_argument(
        "--only",
        action="append",
        choices=tuple(KINDS),
        metavar="KIND",
        help=f"clear only this folder ({', '.join(KINDS)}); repeatable (default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_cache(args: argparse.Namespace) -> int:
    root = cache_root()
    if args.action == "clear":
        kinds = args.only or list(KINDS)
        freed = clear(kinds, root)
        if args.json:
            print(json.dumps({"root": str(root), "cleared": kinds, "bytes_freed": freed}))
        else:
            print(f"cleared {', '.join(kinds)} in {root}: {_mb(freed)} freed")
        return 0
    info = report(root)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"specpass cache: {root} (set SPECPASS_CACHE to move it)")
    for kind, k in info["kinds"].items():
        print(f"  {kind:<9} {k['files']:>5} files {_mb(k['bytes']):>11}  {k['holds']}")
    print(f"  {'total':<9} {'':>11} {_mb(info['bytes']):>11}")
    return 0
