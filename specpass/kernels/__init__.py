"""Build and load specpass's C++ kernels (``torch.ops.specpass.*``): compiled once per machine, then cached.

The operators' schemas and shape functions are defined here, so graphs that call them can be captured, passed
and lowered (AOTInductor calls them through its proxy executor) wherever specpass is imported; their CPU code is
``lowbit.cpp`` with the inner loops of one ISA level (``lowbit_avx512.cpp``, ``lowbit_avx2.cpp`` or
``lowbit_generic.cpp``), compiled with the system's C++ compiler (the one Inductor itself needs) on first use:
the best level this CPU runs, or the one ``$SPECPASS_KERNEL_ISA`` names.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from specpass import machine
from specpass.cache import cache_root, check_private, private_dirs
from specpass.errors import SpecPassError

log = logging.getLogger("specpass.kernels")

_DIR = Path(__file__).parent
#: the kernel ISA levels, best first: one source file each (lowbit_<isa>.cpp), compiled with lowbit.cpp into a
#: library of its own
ISAS = ("avx512", "avx2", "generic")
#: at::parallel_for's threads come from OpenMP where torch uses it; Apple's clang has no -fopenmp (the loops then
#: run on one thread there)
_FLAGS = [
    "-O3",
    "-ffp-contract=fast",
    *([] if platform.system() == "Darwin" else ["-fopenmp"]),
    "-shared",
    "-fPIC",
    "-std=c++20",
    "-DNDEBUG",
]
#: seconds a kernel build may take before it is stopped (a 2-core machine needs about 20)
BUILD_TIMEOUT_S = 300

_lib = torch.library.Library("specpass", "DEF")
#: the tensors of a block matrix, in the operators' argument order
BLOCK_PARTS = ("q", "scale", "shift", "exc_ids", "exc_values")
_BLOCKS = ", ".join(f"Tensor {p}" for p in BLOCK_PARTS) + ", int block, int bits"
_lib.define(f"lowbit_linear(Tensor x, {_BLOCKS}) -> Tensor")
_lib.define(f"lowbit_embedding(Tensor ids, {_BLOCKS}) -> Tensor")
_lib.define(f"lowbit_dequantize({_BLOCKS}) -> Tensor")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor")


def _columns(q, bits):
    return q.shape[1] * (2 if bits == 4 else 1)


@torch.library.register_fake("specpass::lowbit_linear", lib=_lib)
def _linear_fake(x, q, scale, shift, exc_ids, exc_values, block, bits):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.register_fake("specpass::lowbit_embedding", lib=_lib)
def _embedding_fake(ids, q, scale, shift, exc_ids, exc_values, block, bits):
    return scale.new_empty((*ids.shape, _columns(q, bits)))


@torch.library.register_fake("specpass::lowbit_dequantize", lib=_lib)
def _dequantize_fake(q, scale, shift, exc_ids, exc_values, block, bits):
    return scale.new_empty((q.shape[0], _columns(q, bits)))


@torch.library.register_fake("specpass::attention", lib=_lib)
def _attention_fake(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_loaded: tuple[str, str] | None = None  # (isa, library path) of the build this process loaded
_building = threading.Lock()
# Builds that failed in this process, by library path (whose name hashes every input of the build): each pass
# that needs the kernels asks for them per program, and the same inputs fail the same way, after up to
# BUILD_TIMEOUT_S, so each is tried once.
_failed: dict[Path, KernelBuildError] = {}


def kernel_isa() -> str:
    """The ISA level of the kernels to use: ``$SPECPASS_KERNEL_ISA`` (avx512, avx2 or generic) if set, else the
    best this CPU runs."""
    forced = os.environ.get("SPECPASS_KERNEL_ISA", "").strip().lower()
    if forced and forced not in ISAS:
        raise SpecPassError(f"SPECPASS_KERNEL_ISA={forced!r} is not one of {', '.join(ISAS)}; unset it or pick one")
    return forced or machine.kernel_isas()[0]


def loaded_isa() -> str | None:
    """The ISA level of the kernels this process loaded, or None before ``load_kernels()``."""
    return _loaded[0] if _loaded else None


class KernelBuildError(SpecPassError):
    """The kernels cannot be built here (no C++ compiler, a failed or stopped build): exact_lowbit then keeps the
    weights in fp32 instead."""


def build_kernels(isa: str | None = None) -> Path:
    """The library of the ``isa`` kernels (default: ``kernel_isa()``), compiled first if this machine has no build
    of it. Builds for any level, also one this CPU cannot run (to check that it compiles).

    Raises KernelBuildError (with the compiler's message) when there is no C++ compiler or the build fails.
    """
    isa = isa or kernel_isa()
    path, cxx, flags = library_path(isa)
    with _building:  # one build at a time: a second caller waits for the first's library
        if path in _failed:
            raise _failed[path]
        if not path.exists():
            private_dirs(path.parent)
            try:
                _build(cxx, flags, _sources(isa), path, isa)
            except KernelBuildError as e:
                _failed[path] = e
                raise
    return path


def build_in_background() -> None:
    """Start building this CPU's kernels in a thread, if they are not built yet: the compiler runs on another
    core while the caller captures the model, and ``load_kernels`` later waits for it. A build that fails
    here fails again, with its message, where the kernels are loaded."""

    def build() -> None:
        try:
            build_kernels()
        except SpecPassError:
            pass

    if _loaded is None:
        threading.Thread(target=build, name="specpass-kernel-build", daemon=True).start()


def library_path(isa: str) -> tuple[Path, str, list[str]]:
    """(where the ``isa`` build lives in the cache, the compiler, its flags). The name holds a hash of everything
    the build depends on: the sources, flags, compiler, torch, and this CPU's model and ISA extensions
    (``-mtune=native``; and a cache shared between machines must never hand one CPU another's build)."""
    if isa not in ISAS:
        raise SpecPassError(f"unknown kernel ISA {isa!r}; choose from {', '.join(ISAS)}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise KernelBuildError(
            "specpass's low-bit kernels need a C++ compiler (g++); install one, or pass exact_lowbit=False"
        )
    flags = [*_FLAGS, *_isa_flags(isa)]
    parts = [torch.__version__, " ".join(flags), cxx, _compiler_version(cxx), machine.cpu_key()]
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in _sources(isa)), *(p.encode() for p in parts)]))
    return cache_root() / "kernels" / f"lowbit-{isa}-{key.hexdigest()[:16]}.so", cxx, flags


def load_kernels() -> str:
    """Build (once per machine) and load the kernels of ``kernel_isa()``; returns the library's path.

    Raises SpecPassError when the build fails, or when the level was forced to one this CPU cannot run.
    """
    global _loaded
    isa = kernel_isa()
    if _loaded is not None:
        if _loaded[0] != isa:
            raise SpecPassError(
                f"this process already loaded the {_loaded[0]} kernels; SPECPASS_KERNEL_ISA={isa} takes effect in a "
                "new process"
            )
        return _loaded[1]
    missing = machine.missing_flags(isa)
    if missing:  # loading would be an illegal instruction: a dead process
        raise SpecPassError(
            f"this CPU ({machine.cpu_model()}) cannot run the {isa} kernels: it lacks {', '.join(missing)}; unset "
            f"SPECPASS_KERNEL_ISA or choose one of {', '.join(machine.kernel_isas())}"
        )
    path = check_private(build_kernels(isa))
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise SpecPassError(
            f"could not load specpass's low-bit kernels from {path} ({e}); delete that file to rebuild it, or pass "
            "exact_lowbit=False"
        ) from e
    _loaded = (isa, str(path))
    log.info("low-bit kernels: %s (%s)", isa, machine.cpu_model())
    set_test_delay(int(os.environ.get("SPECPASS_KERNEL_TEST_DELAY_US", "0") or 0))
    return str(path)


def build_error() -> KernelBuildError | None:
    """None when the kernels are loaded (built first if need be); else why they cannot be built here."""
    try:
        load_kernels()
    except KernelBuildError as e:
        return e
    return None


def set_test_delay(us: int) -> None:
    """A test hook: every ``lowbit_linear`` call waits ``us`` microseconds more (0: none), so that the kernel loses
    to fp32 on purpose and the measured choice (kernels/choice.py) can be seen to keep fp32. Also set for
    processes started from this one, and applied by ``load_kernels``."""
    os.environ["SPECPASS_KERNEL_TEST_DELAY_US"] = str(int(us))
    if _loaded is not None:
        torch.ops.specpass.lowbit_test_delay(int(us))


def _sources(isa: str) -> list[Path]:
    """The files of an ``isa`` build: the operators, the ISA's inner loops, and the headers both include."""
    return [
        _DIR / "lowbit.cpp",
        _DIR / f"lowbit_{isa}.cpp",
        _DIR / "attention.cpp",
        _DIR / "lowbit.h",
        _DIR / "lowbit_kernel.h",
    ]


def _isa_flags(isa: str) -> list[str]:
    if not machine.is_x86():
        return []  # generic only: the compiler's own target
    # ATen's vector classes (attention.cpp) for the same level: Inductor's macros for its own C++ kernels
    capability = {"avx512": ["-DCPU_CAPABILITY_AVX512"], "avx2": ["-DCPU_CAPABILITY_AVX2"]}.get(isa, [])
    return [f"-march={machine.MARCH[isa]}", "-mtune=native", *capability]


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cxx: str, flags: list[str], sources: list[Path], path: Path, isa: str) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # renamed into place when complete
    os.close(fd)
    start = time.perf_counter()
    log.info("building specpass's %s low-bit kernels (once per CPU and torch version)", isa)
    compile_units = [str(p) for p in sources if p.suffix == ".cpp"]
    try:
        try:
            proc = subprocess.run(
                [cxx, *flags, abi, *includes, *compile_units, "-o", tmp, *libs],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
        except OSError as e:  # the compiler named by $CXX cannot be run
            raise KernelBuildError(f"cannot run the C++ compiler {cxx} ({e}); pass exact_lowbit=False") from e
        except subprocess.TimeoutExpired as e:
            raise KernelBuildError(
                f"building specpass's low-bit kernels took over {BUILD_TIMEOUT_S} s ({cxx}) and was stopped; pass "
                "exact_lowbit=False to run without them"
            ) from e
        if proc.returncode != 0:
            raise KernelBuildError(
                f"building specpass's {isa} low-bit kernels failed ({cxx}); pass exact_lowbit=False to run without "
                "them:\n" + proc.stderr[-2000:]
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s in %.0f s", path.name, time.perf_counter() - start)
