"""A process run as a CPU of a lower x86-64 level (``SPECPASS_CPU_LEVEL``, cpu_level.py): ATen, MKL, oneDNN,
Inductor and specpass's own view of the CPU all capped, in a fresh interpreter (the libraries read it once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specpass import cpu_level, machine
from specpass.bench.llamacpp_process import _features, wider_than
from specpass.errors import SpecPassError

_PROBE = """
import json, os
import specpass, torch
from torch._inductor import config, cpu_vec_isa
from specpass import machine
from specpass.kernels import kernel_isa
from specpass.lower import cpu_target
print(json.dumps({
    "aten": torch.backends.cpu.get_cpu_capability(),
    "inductor_vec": str(cpu_vec_isa.pick_vec_isa()),
    "inductor_march": config.cpp.march,
    "mkl": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
    "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    "levels": machine.kernel_isas(),
    "kernel": kernel_isa(),
    "programs": cpu_target.default_level(),
    "flags": sorted(machine.cpu_flags()),
    "key": machine.cpu_key(),
    "isa": machine.isa_name(),
}))
"""


def _probe(level: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPECPASS_KERNEL_ISA", cpu_level.ENV)}
    if level is not None:
        env[cpu_level.ENV] = level
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def native():
    return _probe(None)


@pytest.mark.skipif(not machine.is_x86() or "avx2" not in machine.kernel_isas(), reason="needs an AVX2 CPU")
def test_run_as_avx2_caps_every_library_and_what_specpass_sees(native):
    got = _probe("avx2")
    assert got["aten"] == "AVX2" and got["inductor_vec"] == "avx2"
    assert got["inductor_march"] == "x86-64-v3 -mtune=native"
    assert got["mkl"] == "AVX2" and got["onednn"] == "AVX2"
    assert got["levels"] == ["avx2", "generic"] and got["kernel"] == got["programs"] == "avx2"
    assert not [f for f in got["flags"] if f.startswith(("avx512", "amx"))] and "avx2" in got["flags"]
    if native["levels"][0] == "avx512":  # a wider CPU: its own caches are not this level's
        assert native["aten"] == "AVX512" and native["kernel"] == "avx512"
        assert got["key"] != native["key"]
        assert got["isa"] == f"AVX2, run as such on an AVX-512 CPU ({cpu_level.ENV}=avx2)"


@pytest.mark.skipif(not machine.is_x86(), reason="an x86-64 level")
def test_run_as_generic_has_no_vector_code():
    got = _probe("generic")
    assert got["aten"] == "DEFAULT" and got["inductor_vec"] == "INVALID_VEC_ISA"
    assert got["levels"] == ["generic"] and got["kernel"] == got["programs"] == "generic"
    assert not [f for f in got["flags"] if f.startswith(("avx", "amx", "fma", "f16c", "bmi"))]


@pytest.mark.skipif("avx2" not in machine.kernel_isas(), reason="torch's kernels here are already the baseline")
def test_a_level_set_after_torch_chose_its_kernels_is_refused():
    """Set too late, the level would measure nothing it says: ATen already dispatches to its wider kernels."""
    code = (
        "import os, torch\n"
        "cap = torch.backends.cpu.get_cpu_capability()\n"
        f"os.environ[{cpu_level.ENV!r}] = 'generic'\n"
        "import specpass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "SpecPassError" in out.stderr
    assert "torch was imported before specpass set the level" in out.stderr


def test_a_level_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_level.ENV, "avx2")
    cpu_level.check_torch("AVX2")  # at the level: nothing to say
    with pytest.raises(SpecPassError, match="names a level this CPU does not run .torch's kernels here: DEFAULT"):
        cpu_level.check_torch("DEFAULT")  # an x86-64 CPU without AVX2
    with pytest.raises(SpecPassError, match="names a level this CPU does not run .torch's kernels here: SVE256"):
        cpu_level.check_torch("SVE256")
    with pytest.raises(SpecPassError, match="torch was imported before specpass set the level"):
        cpu_level.check_torch("AVX512")


def test_a_level_that_does_not_exist_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_level.ENV, "avx9")
    with pytest.raises(SpecPassError, match="SPECPASS_CPU_LEVEL='avx9' is not one of avx2, generic"):
        cpu_level.level()
    monkeypatch.setenv(cpu_level.ENV, "native")
    assert cpu_level.level() is None and cpu_level.describe() == ""


def test_llamacpp_builds_wider_than_the_level_are_named():
    avx512 = b"CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    avx512 += b"AVX512_VNNI = 1 | AVX512_BF16 = 0 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
    features = _features(avx512)
    assert features == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VNNI"]
    assert wider_than(features, "avx2") == ["AVX512", "AVX512_VNNI"]
    assert wider_than(features[:7], "avx2") == []
    assert wider_than(features[:7], "generic") == ["AVX", "AVX2", "F16C", "FMA", "BMI2"]
    assert wider_than(["SSE3", "SSSE3"], "generic") == []
