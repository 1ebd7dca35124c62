"""The low-bit kernels per ISA level, and the measured choice between them and fp32.

Every level this CPU runs is checked in a process of its own (``SPECPASS_KERNEL_ISA``: one build per process):
each block format rebuilt bit for bit, products against ``F.linear`` for 1 to 40 tokens, embeddings exact, and the
fused attention against the matmuls it replaces. A level it cannot run is compiled, and loading it is refused (an
illegal instruction would kill the process).
Caches are keyed by the CPU. The choice keeps fp32 where the kernel is slower (a test hook slows it down), in
``optimize()`` and when an engine is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_exact_lowbit import PERTURBED, grid_llama, on_grid, perturb, rebuilt, same_bits
from test_speculative import _hf

import specpass
from specpass import kernels, machine
from specpass.errors import SpecPassError
from specpass.kernels import choice
from specpass.passes.exact_lowbit import recover_blocks

LOWBIT_LINEAR = torch.ops.specpass.lowbit_linear.default
TESTS = Path(__file__).parent
#: (format, block): every storage the kernels specialize (4/8 bits, with and without a shift, blocks of 16/32)
FORMATS = [("Q4_0", 32), ("Q4_1", 32), ("Q5_0", 32), ("Q5_1", 32), ("Q8_0", 32), ("Q6_K", 16)]
#: 9 blocks of 32 a row: the kernels' unrolled steps of 2 and 4 blocks leave a remainder
COLUMNS = 288


def check_numerics(isa: str) -> None:
    """What every ISA level must give, run by ``test_each_isa_level_this_cpu_runs`` in a process of its own."""
    kernels.load_kernels()
    assert kernels.loaded_isa() == isa == torch.ops.specpass.lowbit_isa(), (kernels.loaded_isa(), isa)
    for fmt, block in FORMATS:
        torch.manual_seed(0)
        w = perturb(on_grid(torch.randn(200, COLUMNS) * 0.05, fmt), [2, 9, 400], block)
        blocks = recover_blocks(w)
        assert blocks.format == fmt and blocks.exc_ids.tolist() == [2, 9, 400], fmt
        assert same_bits(rebuilt(blocks), w), f"{isa} {fmt}: a weight was not rebuilt bit for bit"
        for tokens in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40):
            x = torch.randn(1, tokens, COLUMNS)
            got = torch.ops.specpass.lowbit_linear(x, *blocks.tensors(), blocks.block, blocks.bits)
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5, msg=f"{isa} {fmt} x{tokens}")
        ids = torch.tensor([[0, 3, 199, 0]])
        got = torch.ops.specpass.lowbit_embedding(ids, *blocks.tensors(), blocks.block, blocks.bits)
        assert same_bits(got, F.embedding(ids, w)), f"{isa} {fmt}: embedding rows differ"
    # blocks of 16 with a shift tensor (no GGUF format gives one; the kernels take it): shifts of -0.0
    blocks = recover_blocks(on_grid(torch.randn(40, COLUMNS) * 0.05, "Q6_K"))
    shifted = (*blocks.tensors()[:2], torch.full_like(blocks.scale, -0.0), *blocks.tensors()[3:])
    assert same_bits(torch.ops.specpass.lowbit_dequantize(*shifted, 16, 8), rebuilt(blocks))
    check_attention(isa)
    print(f"numerics ok: {isa}")


def _attention(q, k, v, mask, scale):
    """passes/inline_attention.py's written-out attention: what specpass.attention replaces."""
    return torch.softmax((q * scale) @ k.transpose(-2, -1) + mask, -1) @ v


#: (batch, heads, rows, features, value features, keys, mask batch, mask heads): one row (decode) to past the
#: kernel's row limit (the matmuls then), features that leave a vector tail, keys that split unevenly, a mask
#: per head or broadcast
ATTENTION_SHAPES = [
    (1, 3, 3, 64, 64, 128, 1, 1),
    (1, 3, 1, 64, 64, 1, 1, 1),
    (1, 1, 4, 256, 256, 300, 1, 1),
    (2, 2, 5, 80, 48, 77, 2, 2),
    (1, 4, 10, 40, 40, 33, 1, 4),
    (1, 2, 17, 64, 64, 100, 1, 1),
    (1, 3, 9, 64, 64, 960, 1, 1),
]


def check_attention(isa: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b, h, r, d, dv, w, mb, mh in ATTENTION_SHAPES:
            # keys and values are slices of a longer cache, as the programs pass them
            k = torch.randn(b, h, w + 7, d, generator=gen)[:, :, :w]
            v = torch.randn(b, h, w + 7, dv, generator=gen)[:, :, :w]
            q = torch.randn(b, h, r, d, generator=gen)
            mask = torch.zeros(mb, mh, r, w).masked_fill_(torch.rand(mb, mh, r, w, generator=gen) < 0.3, -torch.inf)
            mask[..., 0, w // 2 :] = -torch.inf  # row 0 sees none of the second half: a thread's part all masked
            mask[..., 0] = 0.0
            got = torch.ops.specpass.attention(q, k, v, mask, 0.17)
            want = _attention(q, k, v, mask, 0.17)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{isa} attention {(b, h, r, d, dv, w)}")
    # a row that sees no key at all: NaN, as the matmuls and SDPA give
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 70, 16)
    mask = torch.zeros(1, 1, 2, 70)
    mask[0, 0, 1] = -torch.inf
    got = torch.ops.specpass.attention(q, k, k, mask, 0.25)
    assert got[0, 0, 1].isnan().all() and not got[0, 0, 0].isnan().any()


def _in_process_of_its_own(isa: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPECPASS_KERNEL_ISA": isa, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("isa", kernels.ISAS)
def test_each_isa_level_this_cpu_runs(isa):
    missing = machine.missing_flags(isa)
    if missing:  # build it (the source must keep compiling), and loading it must be refused, not crash
        path = kernels.build_kernels(isa)
        assert path.is_file() and path.stat().st_size > 0
        run = _in_process_of_its_own(isa, "from specpass.kernels import load_kernels; load_kernels()")
        assert run.returncode != 0
        assert f"cannot run the {isa} kernels: it lacks {missing[0]}" in run.stderr
        pytest.xfail(f"this CPU lacks {', '.join(missing)}: the {isa} kernels were built, not run")
    run = _in_process_of_its_own(isa, f"import test_kernels; test_kernels.check_numerics({isa!r})")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"numerics ok: {isa}" in run.stdout


def test_the_best_level_is_the_default(monkeypatch):
    monkeypatch.delenv("SPECPASS_KERNEL_ISA", raising=False)
    assert kernels.kernel_isa() == machine.kernel_isas()[0]
    assert kernels.loaded_isa() in (None, machine.kernel_isas()[0])
    monkeypatch.setenv("SPECPASS_KERNEL_ISA", "sse9")
    with pytest.raises(SpecPassError, match="SPECPASS_KERNEL_ISA='sse9' is not one of avx512, avx2, generic"):
        kernels.kernel_isa()


def test_a_level_the_cpu_lacks_is_refused_before_loading(monkeypatch):
    flags = frozenset({"sse2", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe", "xsave"})
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("An AVX2 CPU", flags))
    monkeypatch.setattr(machine, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "_loaded", None)  # as in a new process
    monkeypatch.setattr(kernels, "build_kernels", lambda isa=None: pytest.fail("must not build or load"))
    assert machine.kernel_isas() == ["avx2", "generic"]
    monkeypatch.setenv("SPECPASS_KERNEL_ISA", "avx512")
    with pytest.raises(SpecPassError, match=r"\(An AVX2 CPU\) cannot run the avx512 kernels: it lacks avx512f"):
        kernels.load_kernels()


def test_caches_are_keyed_by_the_cpu(monkeypatch, tiny):
    """A cache shared between machines keeps a build per kind of CPU: another CPU model or ISA extension set
    gets a kernel library, Inductor programs and calibrated plans of its own."""
    from specpass.lower import program_cache
    from specpass.tune.plan import model_hash

    model = tiny("llama").model
    before = (kernels.library_path("generic")[0], program_cache._device_tag(torch.device("cpu")), model_hash(model))
    monkeypatch.setattr(machine, "cpu_key", lambda: "x86_64|Another CPU|avx avx2 fma")
    after = (kernels.library_path("generic")[0], program_cache._device_tag(torch.device("cpu")), model_hash(model))
    assert all(a != b for a, b in zip(before, after, strict=True))
    assert not after[0].exists()  # built anew there
    assert "Another CPU" in after[1]


def test_cpu_key_names_the_model_and_isa_flags():
    key = machine.cpu_key()
    assert machine.cpu_model() in key
    if machine.is_x86() and machine.cpu_flags():
        assert "sse2" in key and "hypervisor" not in key  # ISA extensions only: not every /proc/cpuinfo flag


# ---- the measured choice -----------------------------------------------------------------------------------
@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Choices measured here (not forced), kept in a file of this test's own, and the kernel at full speed after."""
    kernels.load_kernels()
    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    monkeypatch.setattr(choice, "choices_path", lambda: tmp_path / "choices.json")
    monkeypatch.setattr(choice, "_memo", {})
    yield
    kernels.set_test_delay(0)


def test_a_slow_kernel_keeps_the_fp32_programs(measured):
    """With every kernel call slowed down by 20 ms (the test hook), optimize() keeps every linear layer in fp32:
    its products are exact_lowbit=False's matrix products, its embedding a row gather either way, its attention
    the fused kernel (not a low-bit choice), and generate equals HF."""
    model = grid_llama()
    kernels.set_test_delay(20_000)
    sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    kernels.set_test_delay(0)
    assert sm.lowbit_choices and not any(r["lowbit"] for r in sm.lowbit_choices.values())
    assert {r["kind"].split("|")[0] for r in sm.lowbit_choices.values()} == {"few_tokens", "prefill"}
    for name in ("prefill", "decode"):
        assert [c["op"] for c in sm.lowbit_calls[name]] == ["embedding"]
    fp32 = specpass.optimize(
        model, speculate=False, backend="eager", max_cache_len=32, progress=False, exact_lowbit=False
    )
    for name in ("prefill", "decode"):
        ops, ops_fp32 = sm.summaries[name]["ops"], fp32.summaries[name]["ops"]
        assert ops["specpass.lowbit_embedding.default"] == ops_fp32["aten.embedding.default"] == 1
        assert "specpass.lowbit_linear.default" not in ops
        products = ("aten.linear.default", "aten.mm.default", "aten.addmm.default", "aten.t.default")
        counts = [ops.get(op, 0) for op in products]
        assert counts == [ops_fp32.get(op, 0) for op in products] and sum(counts) > 0
    assert sm.summaries["decode"]["ops"]["specpass.attention.default"] == model.config.num_hidden_layers
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(sm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None), _hf(model, ids, 8))


def test_the_choice_is_timed_once_per_cpu(measured, monkeypatch):
    model = grid_llama()
    blocks = recover_blocks(model.lm_head.weight)
    calls = [choice.Call(blocks.tensors(), blocks.block, blocks.bits, [model.lm_head.weight])]
    timed = []
    monkeypatch.setattr(choice, "_time", lambda calls, tokens: timed.append(tokens) or (1.0, 2.0))
    first = choice.lowbit_faster(calls, "few_tokens")
    assert first == {"kind": "few_tokens|8bit/32|96x64|x1", "lowbit_ms": 1.0, "fp32_ms": 2.0, "lowbit": True}
    monkeypatch.setattr(choice, "_memo", {})  # a new process: from the file
    assert choice.lowbit_faster(calls, "few_tokens") == first and len(timed) == 1
    assert choice.lowbit_faster(calls, "prefill")["kind"].startswith("prefill|") and len(timed) == 2
    monkeypatch.setattr(machine, "cpu_key", lambda: "x86_64|Another CPU|avx2")
    choice.lowbit_faster(calls, "few_tokens")
    assert len(timed) == 3  # another CPU: timed again


def test_every_kind_is_timed_before_the_prefill_program_compiles(measured, monkeypatch):
    """compile_plain runs decode's passes before prefill's compile starts in a child process: a choice timed
    beside that compile is noise (the wrong one on a 2-core Xeon)."""
    from specpass import programs

    events = []
    monkeypatch.setattr(choice, "_time", lambda calls, tokens: events.append(("time", tokens)) or (1.0, 2.0))
    monkeypatch.setattr(choice, "_time_orders", lambda weights, tokens: events.append(("order",)) or (1.0, 2.0))
    monkeypatch.setattr(choice, "ORDER_MIN_BYTES", 0)

    def lower(gm, backend, *, name, background=False, **kwargs):  # no compile: the order of events is the test
        events.append(("lower", name, background))
        return types.SimpleNamespace()

    monkeypatch.setattr(programs, "lower", lower)
    model = grid_llama()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # off the grid: fp32
    sm = programs.compile_plain(model, backend="inductor", max_cache_len=32, progress=False)
    started = events.index(("lower", "prefill", True))
    assert {e[1] for e in events[:started] if e[0] == "time"} == {(1, 2, 3, 4), (128,)}
    assert ("order",) in events[:started]  # the head's fp32 operand order
    assert events[started + 1 :] == [("lower", "decode", False)]  # nothing timed beside the compile
    assert sm.lowbit_choices and sm.order_choices


def test_registered_fp32_weights_replace_the_kernel():
    kernels.load_kernels()
    torch.manual_seed(0)
    w = on_grid(torch.randn(64, 96) * 0.05, "Q4_1")
    blocks = recover_blocks(w)
    args = (*blocks.tensors(), blocks.block, blocks.bits)
    dense = torch.ops.specpass.lowbit_dequantize(*args)
    x1, x40 = torch.randn(1, 3, 96), torch.randn(1, 40, 96)
    torch.ops.specpass.lowbit_use_dense(blocks.q, dense, True, False)  # few tokens only
    try:
        kernels.set_test_delay(200_000)  # the kernel path would take 0.2 s a call
        start = time.perf_counter()
        got = torch.ops.specpass.lowbit_linear(x1, *args)
        assert time.perf_counter() - start < 0.1
        cols = torch.cat([x1[0], x1.new_zeros(1, 96)]).t()
        assert torch.equal(got[0], torch.mm(dense, cols)[:, :3].t())  # linear_operand_order's fp32 product
        torch.ops.specpass.lowbit_use_dense(blocks.q, dense, True, False, False)  # linear: faster on some CPUs
        assert torch.equal(torch.ops.specpass.lowbit_linear(x1, *args), F.linear(x1, dense))
        kernels.set_test_delay(0)
        torch.testing.assert_close(torch.ops.specpass.lowbit_linear(x40, *args), F.linear(x40, w))
    finally:
        kernels.set_test_delay(0)
        choice.forget_dense([blocks.q])


def test_an_engine_uses_fp32_where_the_kernel_loses_here(measured, tmp_path):
    """An engine stores only the blocks; loaded where the kernel is slower (the hook), its programs multiply by
    fp32 weights rebuilt from them, and generate still equals HF."""
    from specpass.engine import load_engine, write_engine

    model = grid_llama()
    with choice.use_mode("always"):
        sm = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=32, progress=False)
    path = tmp_path / "grid.specpass"
    manifest = write_engine(sm, path)
    assert manifest["lowbit_build"]["isa"] == kernels.loaded_isa()
    assert {c["op"] for c in manifest["programs"]["decode"]["lowbit_calls"]} == {"linear", "embedding"}
    kernels.set_test_delay(20_000)
    engine = load_engine(path)
    assert engine.lowbit_choices and not any(r["lowbit"] for r in engine.lowbit_choices.values())
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    start = time.perf_counter()
    out = engine.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert time.perf_counter() - start < 0.8  # the kernel's 9 calls a step would take 9 x 20 ms a step
    assert torch.equal(out, _hf(model, ids, 8))
    assert set(sm.lowbit) >= set(PERTURBED)


def test_an_engine_on_the_cpu_it_was_compiled_on_reuses_the_measurements(measured, monkeypatch):
    """Loading an engine times its calls as the same kinds as its compile did: on the same CPU it finds those
    measurements (no second timing, which could flip a close call and change the engine's rounding)."""
    from specpass.engine import _lowbit_where_faster

    model = grid_llama()
    monkeypatch.setattr(choice, "_time", lambda calls, tokens: (1.0, 2.0))  # the kernel wins every kind
    sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    assert {c["op"] for c in sm.lowbit_calls["decode"]} == {"linear", "embedding"}
    monkeypatch.setattr(choice, "_memo", {})  # a new process: from the file
    monkeypatch.setattr(choice, "_time", lambda calls, tokens: pytest.fail(f"timed again: {calls[0].shapes}"))
    # the manifest's view of the two programs: every low-bit parameter stored under its own name
    programs = {
        name: {"lowbit_calls": sm.lowbit_calls[name], "constants": {p: p for p in sm.lowbit_params}}
        for name in ("prefill", "decode")
    }
    results, dense = _lowbit_where_faster({"programs": programs}, dict(sm.lowbit_params), "grid.specpass")
    assert results == sm.lowbit_choices and dense == []


def test_the_choice_summary_counts_the_fp32_kinds_per_regime():
    from specpass.kernels.choice import summarize

    choices = {
        "decode|4bit/32+shift|576x576|x30": {"lowbit": True},
        "decode|8bit/32|49152x576|x1": {"lowbit": False},
        "prefill|4bit/32+shift|576x576|x30": {"lowbit": False},
        "prefill|8bit/32|49152x576|x1": {"lowbit": False},
    }
    assert summarize(choices) == (
        "kernel for 1 of 4 kinds of call (timed against fp32 here); fp32 for 1 of the 2 decode kinds, "
        "the 2 prefill kinds"
    )
    assert (
        summarize({k: {"lowbit": True} for k in choices}) == "kernel for 4 of 4 kinds of call (timed against fp32 here)"
    )
    assert summarize({}) == "kernel wherever a weight is on a grid (not timed)"
