"""The x86-64 level CPU programs are compiled for (lower/cpu_target.py): settings, checks, Inductor's vector code."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from torch._inductor import cpu_vec_isa

import specpass
from specpass import machine
from specpass.errors import SpecPassError
from specpass.lower import cpu_target
from specpass.lower.inductor import inductor_configs

_AVX2_CPU = frozenset({"sse2", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe", "xsave"})


@pytest.fixture
def avx2_cpu(monkeypatch):
    """This process as if on an AVX2 CPU without AVX-512."""
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("An AVX2 CPU", _AVX2_CPU))
    monkeypatch.setattr(machine, "is_x86", lambda: True)


def test_cpu_programs_are_compiled_for_this_cpus_best_level_by_default():
    level = cpu_target.default_level()
    configs = inductor_configs(torch.device("cpu"), torch.float32)
    if machine.is_x86():
        assert level == machine.kernel_isas()[0]
        assert configs["cpp.march"] == f"{machine.MARCH[level]} -mtune=native"
        assert cpu_target.level_of(configs) == level
    else:
        assert level == cpu_target.NATIVE and "cpp.march" not in configs
    assert "cpp.march" not in inductor_configs(torch.device("cuda"), torch.float32)  # a GPU program's own


def test_a_level_is_checked_before_anything_is_compiled(avx2_cpu, tiny):
    assert cpu_target.default_level() == "avx2"
    assert cpu_target.check_level("avx2") == "avx2" and cpu_target.check_level("generic") == "generic"
    with pytest.raises(SpecPassError, match=r"\(An AVX2 CPU\) lacks avx512f.*choose one of avx2, generic"):
        cpu_target.check_level("avx512")
    with pytest.raises(SpecPassError, match="isa='sse9' is not an x86-64 level; choose one of avx512, avx2, generic"):
        cpu_target.check_level("sse9")
    with pytest.raises(SpecPassError, match="lacks avx512f"):
        specpass.optimize(tiny("llama").model, speculate=False, isa="avx512", progress=False)
    assert cpu_target.missing("avx2") == [] and cpu_target.missing("avx512")[0] == "avx512f"


def test_off_x86_programs_keep_inductors_flags_and_run_where_compiled(monkeypatch):
    monkeypatch.setattr(machine, "is_x86", lambda: False)
    assert cpu_target.default_level() == cpu_target.NATIVE and cpu_target.configs(cpu_target.NATIVE) == {}
    with pytest.raises(SpecPassError, match="names an x86-64 level"):
        cpu_target.check_level("avx2")
    assert cpu_target.missing(cpu_target.NATIVE, machine.cpu_key()) == []
    assert cpu_target.missing(cpu_target.NATIVE, "aarch64|Another CPU|asimd")


@pytest.mark.parametrize(("level", "vector"), [("avx512", "VecAVX512"), ("avx2", "VecAVX2"), ("generic", None)])
def test_inductor_writes_the_levels_plain_vector_code(level, vector):
    """Not the VNNI or AMX variant a newer CPU offers (their flags let the compiler emit instructions of a CPU
    beyond the level); no vector code for the baseline."""
    if machine.missing_flags(level):
        pytest.skip(f"this CPU cannot compile for {level}: Inductor's probe of the vector ISA runs the code")
    before = cpu_vec_isa.pick_vec_isa()
    with cpu_target.vector_isa(level):
        picked = cpu_vec_isa.pick_vec_isa()
        assert (type(picked).__name__ if picked else None) == vector
    assert cpu_vec_isa.pick_vec_isa() == before
    with cpu_target.vector_isa(None):
        assert cpu_vec_isa.pick_vec_isa() == before


def test_a_packages_vector_isa_names_the_flags_it_needs():
    def package(isa: str) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("p/data/aotinductor/model/abc.wrapper_metadata.json", json.dumps({"AOTI_CPU_ISA": isa}))
        return buf.getvalue()

    assert cpu_target.package_needs(package("AVX512 AVX512_VNNI AMX_TILE")) == [
        *machine.level_flags("avx512"),
        "avx512_vnni",
        "amx_tile",
    ]
    assert cpu_target.package_needs(package("AVX2")) == list(machine.level_flags("avx2"))
    assert cpu_target.package_needs(package("INVALID_VEC_ISA")) == []  # Inductor's name for no vector code
