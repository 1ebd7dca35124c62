"""Where a command will write, checked before its minutes of work: a compile, a bench or a sweep that fails to
write its result at the end has wasted them."""

from __future__ import annotations

import os
from pathlib import Path

from specpass.errors import SpecPassError


def check_output_location(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` (user-expanded) if its folder exists or can be made, and can be written to; else a SpecPassError
    that starts with ``what`` (the option, or what is written)."""
    path = Path(path).expanduser()
    folder = path.parent
    while not folder.exists():  # the writers make the missing folders under the nearest existing one
        folder = folder.parent
    if not folder.is_dir():
        raise SpecPassError(f"{what} {path}: {folder} is a file, not a folder; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecPassError(f"{what} {path}: cannot write in {folder}; give a path in a folder you can write to")
    return path


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """check_output_location for a file: not a folder, and writable where it exists."""
    path = check_output_location(path, what)
    if path.is_dir():
        raise SpecPassError(f"{what} {path} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise SpecPassError(f"{what} {path}: the file exists and is not writable")
    return path
