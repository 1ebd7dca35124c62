"""The compiled-program cache (lower/program_cache.py): hits bind the new model's weights, misses on every key
part, damaged entries recompile with a warning, the switch, and ``specpass cache``."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch
from conftest import tiny_llama

import specpass
from specpass.cli import main
from specpass.lower import program_cache
from specpass.lower.inductor import PendingProgram

N_NEW = 12


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty specpass cache of this test's own (programs and all)."""
    monkeypatch.setenv("SPECPASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(program_cache, "program_dir", lambda: tmp_path / "cache" / "programs")
    return tmp_path / "cache" / "programs"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The programs of ``tiny_llama()`` (prefill and decode), compiled once for this file into a folder of their
    own, and the programs that compile started in a child process: a test that needs a filled cache copies them
    (``filled``) instead of compiling again (about 40 s each on 2 cores)."""
    folder = tmp_path_factory.mktemp("compiled", numbered=True) / "programs"
    started = []
    real_start = PendingProgram.start

    def start(self):
        started.append(self.name)
        real_start(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(program_cache, "program_dir", lambda: folder)
        mp.setattr(PendingProgram, "start", start)
        _optimize(tiny_llama().eval())
    return folder, started


@pytest.fixture
def filled(cache, compiled):
    """This test's own cache, holding a copy of ``compiled``'s programs."""
    cache.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copytree(compiled[0], cache)
    cache.chmod(0o700)
    return cache


def _hf(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False)


def _optimize(model, **kw):
    return specpass.optimize(model, speculate=False, max_cache_len=32, progress=False, **kw)


def _other_weights(seed: int):
    model = tiny_llama()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _no_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("AOTInductor compiled a program that the cache holds")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    monkeypatch.setattr(PendingProgram, "start", refuse)  # nor a child process


def test_a_second_model_of_the_same_graph_loads_its_programs_and_binds_its_own_weights(filled, monkeypatch, caplog):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert sorted(p.suffix for p in filled.iterdir()) == [".json", ".json", ".pt2", ".pt2"]  # prefill, decode
    _no_compile(monkeypatch)
    with caplog.at_level(logging.INFO, logger="specpass.lower"):
        first = _optimize(tiny_llama().eval())  # the weights the programs were compiled with
        second = _optimize(_other_weights(seed=1))
    assert sum("from the program cache" in r.getMessage() for r in caplog.records) == 4
    assert torch.equal(first.generate(ids, max_new_tokens=N_NEW), _hf(first.model, ids))
    want = _hf(second.model, ids)
    assert not torch.equal(want, _hf(first.model, ids))  # different weights, different tokens
    assert torch.equal(second.generate(ids, max_new_tokens=N_NEW), want)
    assert torch.equal(first.generate(ids, max_new_tokens=N_NEW), _hf(first.model, ids))  # first one unaffected


def test_a_damaged_entry_is_compiled_again_with_a_warning(filled, caplog):
    cache = filled
    ids = torch.tensor([[2, 7, 1, 8]])
    packages = sorted(cache.glob("*.pt2"))
    packages[0].write_bytes(packages[0].read_bytes()[:1000])  # truncated
    meta = sorted(cache.glob("*.json"))[1]
    garbage = b"not a package"
    packages[1].write_bytes(garbage)  # a consistent sidecar over bytes that do not load
    record = json.loads(meta.read_text())
    record["sha256"] = __import__("hashlib").sha256(garbage).hexdigest()
    meta.write_text(json.dumps(record))

    model = _other_weights(seed=2)
    with caplog.at_level(logging.WARNING, logger="specpass.lower"):
        sm = _optimize(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "specpass.lower"]
    assert len(warnings) == 2 and all("compiling the program again" in w for w in warnings), warnings
    assert any("damaged" in w for w in warnings) and any("did not load" in w for w in warnings)
    assert torch.equal(sm.generate(ids, max_new_tokens=N_NEW), _hf(model, ids))
    for package in cache.glob("*.pt2"):  # rewritten whole
        assert program_cache.load(package.stem) is not None


def test_a_package_without_its_sidecar_is_not_trusted(filled):
    meta = sorted(filled.glob("*.json"))[0]
    assert program_cache.load(meta.stem) is not None
    meta.unlink()  # a writer that died between the package and its sidecar
    assert program_cache.load(meta.stem) is None


def test_the_key_changes_with_what_the_code_depends_on(tiny):
    from specpass.lower.inductor import inductor_configs
    from specpass.passes import PIPELINES, run_passes
    from specpass.program_export import example_inputs, program_dynamic_shapes

    cg = tiny("llama").cg
    gm = run_passes(cg.gm, PIPELINES["decode"], cg.structure)

    def key(gm=gm, spec=cg.spec, pipeline=PIPELINES["decode"], dtype=torch.float32, constants=None, configs=None):
        args = example_inputs(spec, q=2)
        dyn = program_dynamic_shapes(spec, dynamic_q=True, rewritten=True)
        consts = program_cache.constants_of(gm) if constants is None else constants
        configs = inductor_configs(torch.device("cpu"), dtype) if configs is None else configs
        return program_cache.program_key(gm, args, dyn, configs, pipeline, consts)

    base = key()
    assert key() == base  # deterministic
    constants = program_cache.constants_of(gm)
    assert any(isinstance(t, torch.nn.Parameter) for t in constants.values())
    weights = {n: (torch.nn.Parameter(t + 1) if isinstance(t, torch.nn.Parameter) else t) for n, t in constants.items()}
    assert key(constants=weights) == base  # weights are bound at load: not part of the key
    buffers = [n for n, t in constants.items() if not isinstance(t, torch.nn.Parameter)]
    assert buffers  # rotary tables
    changed = {**constants, buffers[0]: constants[buffers[0]] * 2}
    assert key(constants=changed) != base  # a buffer's values may be folded into the code
    assert key(spec=__import__("dataclasses").replace(cg.spec, max_cache_len=cg.spec.max_cache_len - 8)) != base
    assert key(pipeline=PIPELINES["prefill"]) != base
    assert key(dtype=torch.bfloat16) != base  # other Inductor settings
    assert key(configs=inductor_configs(torch.device("cpu"), torch.float32, few_tokens=True)) != base
    other = run_passes(cg.gm, PIPELINES["prefill"], cg.structure)
    assert key(gm=other) != base


def test_only_the_prefill_runs_inductors_kernels_on_torchs_threads(monkeypatch):
    # decode, verify and draft programs see a few tokens a call: one thread for Inductor's own kernels there
    from specpass import programs
    from specpass.lower.inductor import inductor_configs

    seen = {}
    real = programs.lower

    def record(gm, backend, *, name, few_tokens=False, **kwargs):
        seen[name] = few_tokens
        return real(gm, backend, name=name, few_tokens=few_tokens, **kwargs)

    monkeypatch.setattr(programs, "lower", record)
    _optimize(tiny_llama().eval(), backend="eager")
    assert seen == {"prefill": False, "decode": True}
    cpu = torch.device("cpu")
    assert inductor_configs(cpu, torch.float32, few_tokens=True)["cpp.threads"] == 1
    assert "cpp.threads" not in inductor_configs(cpu, torch.float32)
    assert "cpp.threads" not in inductor_configs(torch.device("cuda"), torch.float32, few_tokens=True)


def test_the_switch_turns_it_off(filled, monkeypatch, caplog):
    """Switched off, the cache is neither read (its programs are compiled again) nor written."""
    before = {p.name: p.stat().st_mtime_ns for p in filled.iterdir()}
    monkeypatch.setenv(program_cache.ENV_SWITCH, "0")
    monkeypatch.setattr(program_cache, "load", lambda key: pytest.fail("the switched-off cache was read"))
    with caplog.at_level(logging.INFO, logger="specpass.lower"):
        _optimize(tiny_llama().eval())
    assert sum("compiled program" in r.getMessage() for r in caplog.records) == 2
    assert {p.name: p.stat().st_mtime_ns for p in filled.iterdir()} == before


def test_cache_command_reports_and_clears(filled, capsys):
    cache = filled
    (cache.parent / "plans").mkdir()
    (cache.parent / "plans" / "x.json").write_text("{}")
    assert main(["cache", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == str(cache.parent)
    assert info["kinds"]["programs"]["files"] == 4 and info["kinds"]["programs"]["bytes"] > 10_000
    assert info["kinds"]["plans"]["files"] == 1 and info["kinds"]["models"]["files"] == 0
    assert main(["cache"]) == 0
    assert "programs" in capsys.readouterr().out
    assert main(["cache", "clear", "--only", "programs"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not cache.exists() and (cache.parent / "plans" / "x.json").exists()
    assert main(["cache", "clear", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cleared"] == ["models", "plans", "programs", "kernels"]
    assert not (cache.parent / "plans").exists()
    with pytest.raises(SystemExit) as e:
        main(["cache", "clear", "--only", "weights"])
    assert e.value.code == 2


def test_prefill_compiles_in_a_child_process_and_a_failed_child_is_compiled_here(compiled, cache, monkeypatch, caplog):
    """compile_plain compiles prefill in a child process while it compiles decode (as the ``compiled`` fixture's
    compile did; the first test checks the tokens of its programs); a child that fails costs a compile here, with a
    warning, not an error."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: programs compile one after the other, in this process")
    assert compiled[1] == ["prefill"]
    monkeypatch.setattr(
        PendingProgram,
        "command",
        staticmethod(lambda *a: [sys.executable, "-c", "raise SystemExit('failed on purpose')"]),
    )
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    model = tiny_llama().eval()
    with caplog.at_level(logging.WARNING, logger="specpass.lower"):
        sm = _optimize(model)
    assert "compiling program prefill in a child process failed (failed on purpose); compiling it here" in caplog.text
    assert torch.equal(sm.generate(ids, max_new_tokens=N_NEW), _hf(model, ids))
    assert len([p for p in cache.iterdir() if p.suffix == ".pt2"]) == 2  # both cached
