"""Build and load specpass's C++ kernels (``torch.ops.specpass.*``): compiled once per machine, then cached.

The operators' schemas and shape functions are defined here, so graphs that call them can be captured, passed
and lowered (AOTInductor calls them through its proxy executor) wherever specpass is imported; their CPU code is
``lowbit.cpp``, compiled with the system's C++ compiler (the one Inductor itself needs) on first use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from specpass.cache import cache_root
from specpass.errors import SpecPassError

log = logging.getLogger("specpass.kernels")

_SOURCE = Path(__file__).with_name("lowbit.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-DNDEBUG"]

_lib = torch.library.Library("specpass", "DEF")
_BLOCKS = "Tensor q, Tensor scale, Tensor shift, Tensor exc_ids, Tensor exc_values, int block, int bits"
_lib.define(f"lowbit_linear(Tensor x, {_BLOCKS}) -> Tensor")
_lib.define(f"lowbit_embedding(Tensor ids, {_BLOCKS}) -> Tensor")
_lib.define(f"lowbit_dequantize({_BLOCKS}) -> Tensor")


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


_loaded: str | None = None


def load_kernels() -> str:
    """Compile ``lowbit.cpp`` if this machine has no build of it yet, load it, and return the library's path.

    Raises SpecPassError (with the compiler's message) when there is no C++ compiler or the build fails.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    source = _SOURCE.read_bytes()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SpecPassError(
            "specpass's low-bit kernels need a C++ compiler (g++); install one, or pass exact_lowbit=False"
        )
    # -march=native: a build is only good for this kind of CPU (a cache shared between machines keeps one each)
    machine = f"{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}|{platform.processor()}"
    parts = [source, torch.__version__.encode(), " ".join(_FLAGS).encode(), cxx.encode(), machine.encode()]
    key = hashlib.sha256(b"\0".join(parts))
    path = cache_root() / "kernels" / f"lowbit-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _build(cxx, path)
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise SpecPassError(
            f"could not load specpass's low-bit kernels from {path} ({e}); delete that file to rebuild it, or pass "
            "exact_lowbit=False"
        ) from e
    _loaded = str(path)
    return _loaded


def _build(cxx: str, path: Path) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # renamed into place when complete
    os.close(fd)
    start = time.perf_counter()
    log.info("building specpass's low-bit kernels (once per machine and torch version)")
    try:
        proc = subprocess.run(
            [cxx, *_FLAGS, abi, *includes, str(_SOURCE), "-o", tmp, *libs], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SpecPassError(
                f"building specpass's low-bit kernels failed ({cxx}); pass exact_lowbit=False to run without them:\n"
                + proc.stderr[-2000:]
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s in %.0f s", path.name, time.perf_counter() - start)
