"""What CPU this process runs on: its model and instruction-set extensions, and the key caches file builds under.

A build for one CPU can be an illegal instruction on another (SIGILL kills the process: no error to catch), so
everything built for "this machine" (the low-bit kernels, Inductor's programs, calibrated plans) is keyed by
``cpu_key()``: the architecture, the CPU's model name and the ISA extensions it reports. A cache shared between
machines (an NFS home, a container image) then holds one build per kind of CPU and never hands one to another.
"""

from __future__ import annotations

import functools
import platform
import re

import torch

from specpass import cpu_level

#: /proc/cpuinfo flags that change what a compiler may emit (vector units, bit manipulation, crypto); the rest
#: (mitigations, hypervisor hints) differ between identical CPUs and would only split the cache
_ISA_FLAG = re.compile(
    r"^(sse\w*|ssse3|avx\w*|amx\w*|fma|f16c|bmi1|bmi2|abm|lzcnt|movbe|popcnt|aes|pclmulqdq|vpclmulqdq|gfni|vaes|"
    r"sha_ni|adx|xsave|cx16|lahf_lm|asimd\w*|sve\w*|sme\d*|fp16|bf16|i8mm|dotprod|neon)$"
)

#: the x86-64 micro-architecture levels of the low-bit kernels (specpass/kernels), best first, with the flags
#: each needs (as /proc/cpuinfo names them; ``abm`` is LZCNT)
X86_LEVELS = {
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "avx2": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
}
MARCH = cpu_level.MARCH


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor, as ``$SPECPASS_CPU_LEVEL`` lets this process see them."""
    model, flags = _proc_cpuinfo()
    return model, _capped(flags)


@functools.cache
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _capped(flags: frozenset[str]) -> frozenset[str]:
    """``flags`` without those above ``$SPECPASS_CPU_LEVEL`` (cpu_level.py): the process runs as such a CPU."""
    cap = cpu_level.level()
    if cap is None:
        return flags
    levels = [*X86_LEVELS, "generic"]
    drop = {f for lvl in levels[: levels.index(cap)] for f in X86_LEVELS[lvl]}
    wider = ("avx512", "amx", "avx_") if cap == "avx2" else ("avx", "amx")  # AVX-512 kinds, AMX, VEX VNNI/IFMA
    return frozenset(f for f in flags if f not in drop and not f.startswith(wider))


def _levels_of(flags: frozenset[str]) -> list[str]:
    """The x86-64 levels whose every flag is in ``flags``, best first (``generic`` not included)."""
    return [lvl for lvl in X86_LEVELS if all(f in flags for f in level_flags(lvl))]


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 7B13``); the platform's processor string where /proc/cpuinfo is absent."""
    return _cpuinfo()[0] or platform.processor() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA extensions as /proc/cpuinfo names them (empty where it is absent)."""
    return frozenset(f for f in _cpuinfo()[1] if _ISA_FLAG.match(f))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def kernel_isas() -> list[str]:
    """The kernel ISA levels this CPU runs, best first: some of ``avx512``, ``avx2``, and always ``generic``."""
    levels = []
    if is_x86():
        flags = _cpuinfo()[1]
        if flags:
            levels = _levels_of(flags)
        else:  # no /proc/cpuinfo (not Linux): what torch's own dispatch found (capped by SPECPASS_CPU_LEVEL too)
            cap = torch.backends.cpu.get_cpu_capability()
            levels = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(cap, [])
    return [*levels, "generic"]


def missing_flags(level: str) -> list[str]:
    """The flags ``level`` needs that this CPU lacks (empty for ``generic``)."""
    if level == "generic":
        return []
    if not is_x86():
        return [f"an x86-64 CPU (this is {platform.machine()})"]
    flags = _cpuinfo()[1]
    need = level_flags(level)
    return [f for f in need if f not in flags] if flags else ([] if level in kernel_isas() else list(need))


def level_flags(level: str) -> tuple[str, ...]:
    """Every flag of ``level`` and of the levels below it (x86-64-v4 includes v3)."""
    below = list(X86_LEVELS)[list(X86_LEVELS).index(level) + 1 :]
    return tuple(f for lvl in (level, *below) for f in X86_LEVELS[lvl])


@functools.cache
def cpu_key() -> str:
    """Architecture, CPU model and ISA extensions: what a build for "this machine" depends on."""
    return f"{platform.machine()}|{cpu_model()}|{' '.join(sorted(cpu_flags()))}"


def isa_name() -> str:
    """The widest vector ISA of this CPU as people name it: ``AVX-512``, ``AVX2``, or the architecture; with
    ``$SPECPASS_CPU_LEVEL``, the level's and the CPU's own (``AVX2, run as such on an AVX-512 CPU``)."""
    named = {"avx512": "AVX-512", "avx2": "AVX2"}
    best = kernel_isas()[0]
    name = named.get(best, f"{platform.machine()} baseline")
    if cpu_level.level() is None:
        return name
    own = next(iter(_levels_of(_proc_cpuinfo()[1])), None)
    return f"{name}, run as such on an {named.get(own, 'unknown')} CPU ({cpu_level.ENV}={cpu_level.level()})"
