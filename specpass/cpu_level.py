"""Runs this process as a CPU of a lower x86-64 level (``$SPECPASS_CPU_LEVEL``): the AVX2 path measured on an AVX-512 CPU.

A speed claim must hold on AVX2 CPUs as well, and the machine at hand may have AVX-512. Forcing specpass's own
kernels (``SPECPASS_KERNEL_ISA``) leaves everything around them on the wider ISA: ATen's kernels (HF eager, the
baseline), MKL's and oneDNN's GEMMs, Inductor's generated code, llama.cpp. ``SPECPASS_CPU_LEVEL=avx2`` (or
``generic``) caps every one of them: ATen through ``ATEN_CPU_CAPABILITY``, MKL through ``MKL_ENABLE_INSTRUCTIONS``,
oneDNN through ``ONEDNN_MAX_CPU_ISA``, Inductor's ``-march`` through ``TORCHINDUCTOR_CPP_MARCH`` (its vector code
follows ATen's capability), and specpass sees only the level's CPU flags (machine.py), so its kernels, programs,
caches and plans are those of such a CPU. llama.cpp cannot be capped at run time: the bench refuses a build that
uses a wider ISA and says how to build one (bench/llamacpp_process.py).

It makes the instruction mix an AVX2 CPU's, not the machine: its caches, memory bandwidth, clocks and
execution units stay. Evidence for the AVX2 code paths, not a measurement of an AVX2 CPU.

The libraries read these settings once, when first used: ``specpass/__init__`` applies them before it imports
torch, and ``check_torch`` refuses a process whose torch already runs wider. This module imports nothing heavy.
"""

from __future__ import annotations

import os

from specpass.errors import SpecPassError

ENV = "SPECPASS_CPU_LEVEL"
#: the compilers' ``-march`` of each x86-64 level (the low-bit kernels' build, Inductor's programs)
MARCH = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "generic": "x86-64"}
#: the levels a CPU can be run as, with what each library is told
_SETTINGS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TORCHINDUCTOR_CPP_MARCH": f"{MARCH['avx2']} -mtune=native",
    },
    "generic": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "TORCHINDUCTOR_CPP_MARCH": f"{MARCH['generic']} -mtune=native",
    },
}
#: what torch.backends.cpu.get_cpu_capability() says when ATen runs at the level
_TORCH_CAPABILITY = {"avx2": "AVX2", "generic": "DEFAULT"}


def level() -> str | None:
    """The level this process runs as (``avx2`` or ``generic``), or None: the CPU's own."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value or value == "native":
        return None
    if value not in _SETTINGS:
        raise SpecPassError(f"{ENV}={value!r} is not one of {', '.join(_SETTINGS)}; unset it or pick one")
    return value


def apply() -> None:
    """Tells ATen, MKL, oneDNN and Inductor the level, before torch is imported (they read it once). A value
    that names no level changes nothing here: ``level()`` refuses it where specpass first asks (machine.py)."""
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen in _SETTINGS:
        os.environ.update(_SETTINGS[chosen])


def check_torch(capability: str) -> None:
    """A SpecPassError unless torch's ATen runs at the level: wider when torch was imported before the level was
    set, narrower (or not x86 at all) when the CPU lacks the level."""
    chosen = level()
    if chosen is None or capability == _TORCH_CAPABILITY[chosen]:
        return
    ranks = ["DEFAULT", "AVX2", "AVX512"]
    if capability in ranks and ranks.index(capability) > ranks.index(_TORCH_CAPABILITY[chosen]):
        raise SpecPassError(
            f"{ENV}={chosen} but torch already runs its {capability} kernels: torch was imported before specpass "
            f"set the level; export {ENV} before Python starts, or import specpass before torch"
        )
    raise SpecPassError(
        f"{ENV}={chosen} names a level this CPU does not run (torch's kernels here: {capability}); unset it"
    )


def describe() -> str:
    """What the level changed, for a report: empty when the CPU runs as itself."""
    chosen = level()
    if chosen is None:
        return ""
    settings = ", ".join(f"{k}={v}" for k, v in _SETTINGS[chosen].items())
    return f"run as {chosen} ({ENV}={chosen}: {settings}; the kernels and programs of that level)"
