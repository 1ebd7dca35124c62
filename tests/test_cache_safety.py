"""What specpass loads from its cache, and what it does without a C++ compiler: folders are created private, code
and plans are loaded only from folders nobody else can write, and a machine that cannot build the kernels gets
the fp32 programs with one warning (an engine that needs them, one clear line)."""

from __future__ import annotations

import importlib
import logging
import os
import stat

import pytest
import torch
from conftest import build_tiny
from test_exact_lowbit import grid_llama
from test_speculative import _hf

import specpass
from specpass import kernels
from specpass.cache import check_private, write_atomic
from specpass.cli import main
from specpass.errors import SpecPassError
from specpass.lower import program_cache
from specpass.tune import plan as plan_module
from specpass.tune.plan import SpecPlan, cached_plan

exact_lowbit_pass = importlib.import_module("specpass.passes.exact_lowbit")  # the module, not the pass function


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cache_folders_are_created_private(tmp_path):
    root = tmp_path / "cache"
    write_atomic(root / "plans" / "x.json", b"{}")
    assert _mode(root) == 0o700 and _mode(root / "plans") == 0o700


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A cache folder every user may write (mode 0777, no sticky bit), holding a plan and a program entry."""
    root = tmp_path / "shared"
    (root / "plans").mkdir(parents=True)
    (root / "programs").mkdir()
    (root / "plans" / "k.json").write_text(SpecPlan(speculate=False).to_json())
    (root / "programs" / "k.pt2").write_bytes(b"package")
    (root / "programs" / "k.json").write_text('{"sha256": "0"}')
    monkeypatch.setattr(plan_module, "plan_cache_dir", lambda: root / "plans")
    monkeypatch.setattr(program_cache, "program_dir", lambda: root / "programs")
    os.chmod(root, 0o777)
    return root


def test_plans_and_programs_are_not_loaded_from_a_folder_others_can_write(shared):
    with pytest.raises(SpecPassError, match=r"shared can be written by other users \(mode 777\).*chmod 700"):
        cached_plan("k")
    with pytest.raises(SpecPassError, match="can be written by other users"):
        program_cache.load("k")
    os.chmod(shared, 0o700)
    assert cached_plan("k") is not None  # private again: loaded


def test_kernels_are_not_loaded_from_a_folder_others_can_write(shared, monkeypatch):
    library = shared / "kernels" / "lowbit-x.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF not really")
    monkeypatch.setattr(kernels, "_loaded", None)  # as in a new process
    monkeypatch.setattr(kernels, "build_kernels", lambda isa=None: library)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: pytest.fail("dlopen of a library others can write"))
    with pytest.raises(SpecPassError, match="can be written by other users"):
        kernels.load_kernels()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root")
def test_a_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    os.chown(folder, 65534, 65534)
    with pytest.raises(SpecPassError, match=r"theirs belongs to another user \(uid 65534\)"):
        check_private(folder / "plan.json")


def test_a_folder_others_may_write_with_the_sticky_bit_is_fine(tmp_path):
    sticky = tmp_path / "tmp-like"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "mine").mkdir(mode=0o700)
    assert check_private(sticky / "mine") == sticky / "mine"


@pytest.fixture
def no_compiler(monkeypatch):
    def fail():
        raise kernels.KernelBuildError("specpass's low-bit kernels need a C++ compiler (g++); install one")

    monkeypatch.setattr(kernels, "load_kernels", fail)
    monkeypatch.setattr(exact_lowbit_pass, "_fallback_said", False)
    return fail


def test_without_a_compiler_optimize_keeps_fp32_with_one_warning(no_compiler, caplog):
    model = grid_llama()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with caplog.at_level(logging.WARNING, logger="specpass"):
        sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    said = [r.getMessage() for r in caplog.records if "weights stay fp32" in r.getMessage()]
    assert len(said) == 1 and "need a C++ compiler" in said[0]
    assert sm.lowbit == {}
    assert torch.equal(sm.generate(ids, max_new_tokens=8, eos_token_id=[]), _hf(model, ids, 8))


def test_an_engine_of_blocks_without_a_compiler_is_one_line(tmp_path, monkeypatch, capsys):
    from specpass.engine import write_engine

    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "always")
    sm = specpass.optimize(grid_llama(), speculate=False, max_cache_len=32, progress=False)
    path = tmp_path / "grid.specpass"
    write_engine(sm, path)

    def fail():
        raise kernels.KernelBuildError("specpass's low-bit kernels need a C++ compiler (g++); install one")

    monkeypatch.setattr(kernels, "load_kernels", fail)
    assert main(["run", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("specpass: error:") and "stores weights as low-bit blocks" in err[-1]
    assert "need a C++ compiler" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("exact_lowbit", [True, False])
def test_an_fp32_engine_needs_a_compiler_only_for_the_fused_attention(tmp_path, monkeypatch, exact_lowbit):
    """fp32 weights (a model not on a grid): the programs call specpass's fused attention unless exact_lowbit=False
    (``--no-exact-lowbit``), and only then does the engine load where the kernels cannot be built."""
    from specpass.engine import load_engine, write_engine

    model = build_tiny("llama")
    sm = specpass.optimize(model, speculate=False, max_cache_len=32, progress=False, exact_lowbit=exact_lowbit)
    assert sm.lowbit == {}
    path = tmp_path / "fp32.specpass"
    write_engine(sm, path)

    def fail():
        raise kernels.KernelBuildError("specpass's low-bit kernels need a C++ compiler (g++); install one")

    monkeypatch.setattr(kernels, "load_kernels", fail)
    if exact_lowbit:
        with pytest.raises(SpecPassError, match=r"calls specpass's C\+\+ kernels, which cannot be built here: .*g\+\+"):
            load_engine(path)
    else:
        ids = torch.tensor([[3, 14, 15, 9]])
        assert torch.equal(load_engine(path).generate(ids, max_new_tokens=6, eos_token_id=[]), _hf(model, ids, 6))


def test_a_failed_build_is_tried_once_per_process(tmp_path, monkeypatch):
    """Both kernel passes ask for the kernels in every program: a build that failed (after up to BUILD_TIMEOUT_S)
    is not run again with the same inputs, and each pass hears the same error."""
    monkeypatch.setenv("SPECPASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_loaded", None)
    builds = []

    def failing(cxx, flags, sources, path, isa):
        builds.append(path)
        raise kernels.KernelBuildError(f"building specpass's {isa} low-bit kernels failed ({cxx})")

    monkeypatch.setattr(kernels, "_build", failing)
    first, second = kernels.build_error(), kernels.build_error()
    assert isinstance(first, kernels.KernelBuildError) and second is first and len(builds) == 1
    with pytest.raises(kernels.KernelBuildError):
        kernels.build_kernels(next(i for i in kernels.ISAS if i != kernels.kernel_isa()))  # other inputs: anew
    assert len(builds) == 2


def test_a_build_that_runs_too_long_is_stopped_and_leaves_nothing(tmp_path, monkeypatch):
    import subprocess

    def too_long(cmd, **kwargs):
        out = cmd[cmd.index("-o") + 1]
        with open(out, "wb") as f:
            f.write(b"half a library")  # what a compiler leaves when it is killed
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(kernels.subprocess, "run", too_long)
    target = tmp_path / "kernels" / "lowbit-generic-x.so"
    target.parent.mkdir()
    with pytest.raises(kernels.KernelBuildError, match=r"took over \d+ s .* and was stopped"):
        kernels._build("g++", [], kernels._sources("generic"), target, "generic")
    assert list(target.parent.iterdir()) == []
