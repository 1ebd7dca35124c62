"""The x86-64 level AOTInductor compiles CPU programs for, so that a program never holds instructions its CPU lacks.

Inductor builds its C++ with ``-march=native`` and the widest vector ISA the compiling CPU has (AVX-512 with VNNI
and AMX on a recent Xeon): a package written on one machine is an illegal instruction on a CPU without those
(SIGILL kills the process: nothing to catch). Programs here are compiled for a named level instead: the
x86-64-v4 / v3 / baseline ``-march`` and Inductor's plain AVX-512 / AVX2 / scalar vector code, with this CPU's
tuning. An engine records its level, and loading refuses a CPU that lacks the level's flags (engine.py). Off
x86 the level is ``native``: Inductor's own flags, and an engine then runs only where it was compiled.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import zipfile
from unittest import mock

from specpass import machine
from specpass.errors import SpecPassError

NATIVE = "native"
#: what ``cpp.march`` says per level; the tuning stays this CPU's (it changes no instruction)
_MARCH = {level: f"{march} -mtune=native" for level, march in machine.MARCH.items()}
_LEVEL = {march: level for level, march in _MARCH.items()}


def default_level() -> str:
    """The best level this CPU runs: ``avx512``, ``avx2`` or ``generic``; ``native`` off x86."""
    return machine.kernel_isas()[0] if machine.is_x86() else NATIVE


def check_level(level: str) -> str:
    """``level`` if this CPU can compile and run programs for it; a SpecPassError saying what to pick otherwise."""
    if not machine.is_x86():
        if level != NATIVE:
            raise SpecPassError(f"isa={level!r} names an x86-64 level; this CPU is {platform.machine()}: leave isa out")
        return level
    if level not in _MARCH:
        raise SpecPassError(f"isa={level!r} is not an x86-64 level; choose one of {', '.join(_MARCH)}")
    missing = machine.missing_flags(level)
    if missing:
        raise SpecPassError(
            f"this CPU ({machine.cpu_model()}) lacks {', '.join(missing)}, which isa={level!r} needs, so the programs "
            f"could not be checked here; choose one of {', '.join(machine.kernel_isas())}"
        )
    return level


def configs(level: str) -> dict:
    """Inductor's settings that compile for ``level`` (none for ``native``: Inductor's own)."""
    return {} if level == NATIVE else {"cpp.march": _MARCH[level]}


def missing(level: str, cpu_key: str | None = None) -> list[str]:
    """What this CPU lacks to run programs compiled for ``level`` (``native``: on the CPU ``cpu_key`` names)."""
    if level == NATIVE:
        return [] if cpu_key == machine.cpu_key() else [f"the instructions of the CPU it was compiled on ({cpu_key})"]
    return machine.missing_flags(level) if level in _MARCH else [f"the unknown level {level!r}"]


def package_needs(package: bytes) -> list[str]:
    """The CPU flags the vector code of an AOTInductor package needs, from the ISA its metadata names
    (``AVX512 AVX512_VNNI AMX_TILE``)."""
    with zipfile.ZipFile(io.BytesIO(package)) as z:
        meta = next((n for n in z.namelist() if n.endswith("wrapper_metadata.json")), None)
        isa = json.loads(z.read(meta)).get("AOTI_CPU_ISA", "") if meta else ""
    words = [w for w in isa.lower().split() if w != "invalid_vec_isa"]  # no vector code: nothing needed
    return [f for w in words for f in (machine.level_flags(w) if w in machine.X86_LEVELS else (w,))]


def level_of(inductor_configs: dict) -> str | None:
    """The level ``inductor_configs`` compile for (None: ``-march=native``, Inductor's default)."""
    return _LEVEL.get(inductor_configs.get("cpp.march"))


@contextlib.contextmanager
def vector_isa(level: str | None):
    """Inductor's vector code for ``level`` while compiling: plain AVX-512 (not the VNNI or AMX variants a
    newer CPU offers), AVX2, or none; nothing changed for None."""
    if level is None:
        yield
        return
    from torch._inductor import cpu_vec_isa

    wanted = {"avx512": "VecAVX512", "avx2": "VecAVX2"}.get(level)
    chosen = [isa for isa in cpu_vec_isa.valid_vec_isa_list() if type(isa).__name__ == wanted]
    with mock.patch.object(cpu_vec_isa, "valid_vec_isa_list", lambda: chosen):
        yield


class _IsaMismatch(logging.Filter):
    """Drops AOTInductor's warning that a package's vector ISA is not the one it would pick on this CPU: specpass
    compiles for a level on purpose, and an engine checks its CPU's flags itself (engine.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "AOTI_CPU_ISA" not in record.getMessage()


@contextlib.contextmanager
def quiet_isa_mismatch():
    """AOTInductor's package loader without its ISA-mismatch warning."""
    logger, hush = logging.getLogger("torch.export.pt2_archive._package"), _IsaMismatch()
    logger.addFilter(hush)
    try:
        yield
    finally:
        logger.removeFilter(hush)


def compile_package(exported, package_path: str, inductor_configs: dict) -> str:
    """``aoti_compile_and_package`` for the level ``inductor_configs`` name; returns the package's path."""
    import torch

    with vector_isa(level_of(inductor_configs)):
        return torch._inductor.aoti_compile_and_package(
            exported, package_path=package_path, inductor_configs=inductor_configs
        )
