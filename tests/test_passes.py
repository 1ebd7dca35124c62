"""Passes and the pass manager: op counts, numerics against eager, the manager's invariants and errors.

Every pass in ``specpass.passes.PIPELINES`` needs here at least one ``test_<pass>_*`` test and in
``tests/goldens/<pass>/`` at least one golden; ``test_every_pass_has_tests_and_goldens`` enforces it.
"""

from __future__ import annotations

import collections
import json
import sys

import pytest
import torch
from conftest import ARCHS, GOLDENS

from specpass.errors import SpecPassError
from specpass.graph_text import normalize
from specpass.passes import (
    PIPELINES,
    DraftConfig,
    PassResult,
    clone_graph_module,
    draft_pipeline,
    exact_lowbit,
    exit_predictions,
    fold_gqa_heads,
    fused_attention,
    inline_attention,
    insert_early_exit,
    last_token_logits,
    linear_operand_order,
    prune_lm_head,
    run_passes,
    skip_layers,
    tree_verify,
    with_options,
)
from specpass.passes.manager import remap
from specpass.program_export import example_inputs

#: the tiny-model tests that check a torch version (`python -m pytest -m compat` runs them on the installed torch)
pytestmark = pytest.mark.compat

SLICE = torch.ops.aten.slice.Tensor
LINEAR = torch.ops.aten.linear.default
INDEX_COPY = torch.ops.aten.index_copy_.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def tagged(gm: torch.fx.GraphModule, pass_name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if (n.meta.get("specpass") or {}).get("pass") == pass_name]


def run_program(gm, spec, ids: torch.Tensor):
    """Run a chain prefill of ``ids`` on fresh KV buffers; return (logits, kv)."""
    q = ids.shape[1]
    _, pos, slots, *rest = example_inputs(spec, q=q)
    n_masks = len(spec.mask_kinds)
    masks, kv = rest[:n_masks], rest[n_masks:]
    causal = torch.full((q, spec.max_cache_len), torch.finfo(spec.dtype).min, dtype=spec.dtype).triu(1)
    masks = [causal[None, None].clone() for _ in masks]
    with torch.no_grad():
        logits = gm(ids, pos, slots, *masks, *kv)
    return logits, kv


def assert_same_outputs(t, reference, gm, ids: torch.Tensor, tol: float = 1e-5) -> None:
    """``gm`` gives ``reference``'s logits and K/V for ``ids`` within ``tol``, and HF's logits within 1e-5."""
    ref_logits, ref_kv = run_program(reference, t.cg.spec, ids)
    logits, kv = run_program(gm, t.cg.spec, ids)
    assert logits.shape == ref_logits.shape == (1, ids.shape[1], t.vocab)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(logits, t.model(ids).logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(ref_kv, kv, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------------
# The guard against test rot
# --------------------------------------------------------------------------------------------------------
def all_passes() -> list[str]:
    return sorted({p.__name__ for passes in PIPELINES.values() for p in passes})


def test_every_pass_has_tests_and_goldens():
    tests = [name for name in vars(sys.modules[__name__]) if name.startswith("test_")]
    for name in all_passes():
        assert any(t.startswith(f"test_{name}_") for t in tests), f"tests/test_passes.py has no test_{name}_* test"
        folder = GOLDENS / name
        archs = {f.stem.split("-", 1)[1] for f in folder.glob("*.txt")}
        assert len(archs) >= 3, f"goldens in {folder} cover {sorted(archs)}: at least 3 architectures needed"
    # And the other way round: no golden folder outlives its pass.
    keep = {"capture", "signature", *all_passes()}
    stale = sorted(d.name for d in GOLDENS.iterdir() if d.is_dir() and d.name not in keep)
    assert not stale, f"golden folders {stale} name no pass in PIPELINES; delete them"


# --------------------------------------------------------------------------------------------------------
# last_token_logits
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_token_logits_op_counts(tiny, arch):
    cg = tiny(arch).cg
    before = op_counts(cg.gm)
    gm = run_passes(cg.gm, (last_token_logits,), cg.structure)
    after = op_counts(gm)

    assert after - before == collections.Counter({SLICE: 1})
    assert before - after == collections.Counter()
    (new,) = tagged(gm, "last_token_logits")
    assert new.target == SLICE and new.args[1:] == (1, -1, 9223372036854775807)
    # It feeds the LM head, which now yields (B, 1, V).
    (head,) = new.users
    assert head.target == LINEAR
    vocab = tiny(arch).vocab
    assert tuple(head.meta["val"].shape) == (1, 1, vocab)
    hidden = head.args[1].meta["val"].shape[1]  # the head weight is (V, H)
    assert tuple(new.meta["val"].shape) == (1, 1, hidden)
    assert new.meta["nn_module_stack"] == head.meta["nn_module_stack"]
    # The target path is intact: every KV write and attention survives dead-code elimination.
    assert after[INDEX_COPY] == before[INDEX_COPY] == 2 * cg.spec.num_layers
    assert after[SDPA] == before[SDPA] == cg.spec.num_layers


def test_last_token_logits_returns_a_result(tiny):
    cg = tiny("llama").cg
    gm, node_map = clone_graph_module(cg.gm)
    result = last_token_logits(gm, remap(cg.structure, node_map), None)
    assert isinstance(result, PassResult)
    assert result.gm is gm and result.modified and result.n_matches == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_token_logits_matches_eager(tiny, arch):
    t = tiny(arch)
    cg = t.cg
    prefill = run_passes(cg.gm, PIPELINES["prefill"], cg.structure)
    ids = torch.randint(0, t.vocab, (1, 7), generator=torch.Generator().manual_seed(1))

    full_logits, full_kv = run_program(cg.gm, cg.spec, ids)
    last_logits, last_kv = run_program(prefill, cg.spec, ids)
    with torch.no_grad():
        hf = t.model(ids).logits

    assert last_logits.shape == (1, 1, t.vocab)
    torch.testing.assert_close(last_logits, full_logits[:, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last_logits, hf[:, -1:], atol=1e-5, rtol=1e-5)
    # The prefill program still writes the whole prompt's K/V (only the head was cut; fold_gqa_heads, also in
    # the pipeline, may round attention differently by an ulp, as torch 2.11's CPU SDPA does).
    for a, b in zip(full_kv, last_kv, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_last_token_logits_leaves_the_captured_graph_untouched(tiny):
    cg = tiny("llama").cg
    text, n_nodes, meta = normalize(cg.gm), len(cg.gm.graph.nodes), dict(cg.gm.meta)
    gm = run_passes(cg.gm, PIPELINES["prefill"], cg.structure)
    assert gm is not cg.gm and gm.graph is not cg.gm.graph
    assert normalize(cg.gm) == text and len(cg.gm.graph.nodes) == n_nodes
    assert "specpass" not in cg.gm.meta and cg.gm.meta.keys() == meta.keys()
    assert not tagged(cg.gm, "last_token_logits")
    # The copy shares the weights: no parameter was duplicated.
    assert gm.get_parameter("model.lm_head.weight") is cg.gm.get_parameter("model.lm_head.weight")


# --------------------------------------------------------------------------------------------------------
# fold_gqa_heads
# --------------------------------------------------------------------------------------------------------
EXPAND = torch.ops.aten.expand.default


def _repeat_kv_inputs(gm) -> int:
    """SDPA key/value inputs that are HF's repeat_kv (reshape of an expand)."""
    return sum(
        1
        for n in gm.graph.nodes
        if n.target == SDPA
        for a in n.args[1:3]
        if a.target in (torch.ops.aten.reshape.default, torch.ops.aten.view.default) and a.args[0].target == EXPAND
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fold_gqa_heads_op_counts(tiny, arch):
    cg = tiny(arch).cg
    layers = cg.spec.num_layers
    gm = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    before, after = op_counts(cg.gm), op_counts(gm)
    assert _repeat_kv_inputs(cg.gm) == 2 * layers and _repeat_kv_inputs(gm) == 0
    # Two K/V expands per layer go; one mask expand per layer comes (the mask is tiny).
    assert after[EXPAND] == before[EXPAND] - layers
    assert after[SDPA] == before[SDPA] == layers
    assert len([n for n in tagged(gm, "fold_gqa_heads") if n.target == SDPA]) == layers
    assert gm.meta["specpass"]["history"] == [{"pass": "fold_gqa_heads", "modified": True, "n_matches": layers}]


def test_fold_gqa_heads_leaves_multi_head_attention_alone(tiny):
    cg = tiny("gpt2").cg
    gm = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    assert normalize(gm) == normalize(cg.gm)
    assert gm.meta["specpass"]["history"] == [{"pass": "fold_gqa_heads", "modified": False, "n_matches": 0}]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fold_gqa_heads_matches_eager(tiny, arch):
    t = tiny(arch)
    cg = t.cg
    folded = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    ids = torch.randint(0, t.vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    # K/V bit-equal on torch 2.13; 2.11's CPU SDPA rounds one ulp apart
    assert_same_outputs(t, cg.gm, folded, ids, tol=1e-6)


# --------------------------------------------------------------------------------------------------------
# inline_attention
# --------------------------------------------------------------------------------------------------------
MATMUL = torch.ops.aten.matmul.default
SOFTMAX = torch.ops.aten._softmax.default


@pytest.mark.parametrize("arch", ARCHS)
def test_inline_attention_op_counts(tiny, arch):
    cg = tiny(arch).cg
    layers = cg.spec.num_layers
    folded = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    gm = run_passes(cg.gm, (fold_gqa_heads, inline_attention), cg.structure)
    before, after = op_counts(folded), op_counts(gm)
    assert before[SDPA] == layers and after[SDPA] == 0
    assert after[MATMUL] == before[MATMUL] + 2 * layers and after[SOFTMAX] == before[SOFTMAX] + layers
    assert len([n for n in tagged(gm, "inline_attention") if n.target == MATMUL]) == 2 * layers
    assert gm.meta["specpass"]["history"][-1] == {"pass": "inline_attention", "modified": True, "n_matches": layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_inline_attention_matches_eager(tiny, arch):
    t = tiny(arch)
    cg = t.cg
    sdpa = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    inlined = run_passes(cg.gm, (fold_gqa_heads, inline_attention), cg.structure)
    ids = torch.randint(0, t.vocab, (1, 9), generator=torch.Generator().manual_seed(3))
    assert_same_outputs(t, sdpa, inlined, ids)  # layer 0's K/V precede any attention; later ones read its output


def _as_bfloat16(gm, structure, cfg=None) -> PassResult:
    """The graph's values as a bfloat16 model would give them (the metadata only: nothing runs it)."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == torch.float32:
            node.meta["val"] = val.to(torch.bfloat16)
    return PassResult(gm, True, 1)


@pytest.mark.parametrize("attention_pass", [inline_attention, fused_attention], ids=lambda p: p.__name__)
def test_attention_passes_leave_other_dtypes_to_sdpa(tiny, attention_pass):
    cg = tiny("llama").cg
    gm = run_passes(cg.gm, (fold_gqa_heads, _as_bfloat16, attention_pass), cg.structure)
    name = attention_pass.__name__
    assert gm.meta["specpass"]["history"][-1] == {"pass": name, "modified": False, "n_matches": 0}
    assert op_counts(gm)[SDPA] == cg.spec.num_layers


def test_inline_attention_keeps_tree_verification(tiny):
    # tree_verify proves every layer's attention reads the mask inputs: the softmax now stands for the SDPA call.
    cg = tiny("llama").cg
    gm = run_passes(cg.gm, with_options(PIPELINES["verify"], exact_lowbit=False), cg.structure)
    assert op_counts(gm)[SDPA] == 0 and op_counts(gm)[SOFTMAX] == cg.spec.num_layers
    assert [h["pass"] for h in gm.meta["specpass"]["history"]][-1] == "tree_verify"
    assert "inline_attention" not in [p.__name__ for p in PIPELINES["prefill"]]


# --------------------------------------------------------------------------------------------------------
# fused_attention
# --------------------------------------------------------------------------------------------------------
FUSED = torch.ops.specpass.attention.default
fused_attention_module = sys.modules["specpass.passes.fused_attention"]  # the module, not the pass function


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_attention_op_counts(tiny, arch):
    cg = tiny(arch).cg
    layers = cg.spec.num_layers
    folded = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    gm = run_passes(cg.gm, (fold_gqa_heads, fused_attention, inline_attention), cg.structure)
    before, after = op_counts(folded), op_counts(gm)
    assert before[SDPA] == layers and after[SDPA] == 0 and after[FUSED] == layers
    assert after[MATMUL] == before[MATMUL] and after[SOFTMAX] == before[SOFTMAX]  # nothing left to write out
    assert [n.target for n in tagged(gm, "fused_attention")] == [FUSED] * layers
    history = gm.meta["specpass"]["history"]
    assert history[-2] == {"pass": "fused_attention", "modified": True, "n_matches": layers}
    assert history[-1] == {"pass": "inline_attention", "modified": False, "n_matches": 0}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tokens", [2, 9])  # a few query rows a head, and more than the kernel loops over
def test_fused_attention_matches_eager(tiny, arch, tokens):
    t = tiny(arch)
    cg = t.cg
    sdpa = run_passes(cg.gm, (fold_gqa_heads,), cg.structure)
    fused = run_passes(cg.gm, (fold_gqa_heads, fused_attention), cg.structure)
    ids = torch.randint(0, t.vocab, (1, tokens), generator=torch.Generator().manual_seed(3))
    assert_same_outputs(t, sdpa, fused, ids)


def test_fused_attention_keeps_tree_verification(tiny):
    # tree_verify proves every layer's attention reads the mask inputs: the fused call reads the mask itself.
    cg = tiny("llama").cg
    gm = run_passes(cg.gm, PIPELINES["verify"], cg.structure)
    assert op_counts(gm)[SDPA] == 0 and op_counts(gm)[FUSED] == cg.spec.num_layers
    assert [h["pass"] for h in gm.meta["specpass"]["history"]][-1] == "tree_verify"
    assert "fused_attention" not in [p.__name__ for p in PIPELINES["prefill"]]


def test_fused_attention_without_kernels_leaves_the_matmuls_to_inline_attention(tiny, monkeypatch):
    cg = tiny("llama").cg
    layers = cg.spec.num_layers
    monkeypatch.setattr(fused_attention_module, "build_error", lambda: RuntimeError("no C++ compiler"))
    gm = run_passes(cg.gm, (fold_gqa_heads, fused_attention, inline_attention), cg.structure)
    assert op_counts(gm)[FUSED] == 0 and len(tagged(gm, "inline_attention")) > 0
    assert gm.meta["specpass"]["history"][-2] == {"pass": "fused_attention", "modified": False, "n_matches": 0}
    assert op_counts(gm)[SOFTMAX] == layers


def test_fused_attention_is_off_with_exact_lowbit():
    # optimize(model, exact_lowbit=False) uses none of specpass's C++ kernels: its engines load without a compiler
    for name, pipeline in PIPELINES.items():
        names = [p.__name__ for p in with_options(pipeline, exact_lowbit=False)]
        assert "fused_attention" not in names and "exact_lowbit" not in names, name
        assert names == [p.__name__ for p in pipeline if p.__name__ not in ("fused_attention", "exact_lowbit")]


# --------------------------------------------------------------------------------------------------------
# linear_operand_order
# --------------------------------------------------------------------------------------------------------
MM = torch.ops.aten.mm.default
CAT = torch.ops.aten.cat.default


def _weight_linears(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == LINEAR and n.args[1].op == "get_attr"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_linear_operand_order_op_counts(tiny, arch):
    cg = tiny(arch).cg
    linears = _weight_linears(cg.gm)
    gm = run_passes(cg.gm, (linear_operand_order,), cg.structure)
    before, after = op_counts(cg.gm), op_counts(gm)
    # llama/qwen2: 7 linears a layer and the head; gpt2's layers are Conv1D (addmm), only its head is a linear
    assert len(linears) == (1 if arch == "gpt2" else 7 * cg.spec.num_layers + 1)
    assert after[LINEAR] == before[LINEAR] - len(linears) == 0
    assert after[MM] == before[MM] + len(linears)
    # one pad row per distinct input: q/k/v share one, gate/up another
    assert after[CAT] == before[CAT] + len({n.args[0] for n in linears})
    assert after[INDEX_COPY] == before[INDEX_COPY] and after[SDPA] == before[SDPA]
    for mm in (n for n in gm.graph.nodes if n.target == MM and "specpass" in n.meta):
        weight = mm.args[0]  # weight-stationary: the constant is the left operand
        assert weight.op == "get_attr" and weight.meta["val"].dim() == 2
        assert mm.meta["val"].shape[0] == weight.meta["val"].shape[0]
        assert mm.meta["nn_module_stack"]  # the linear's module, kept for structure lookups
    assert gm.meta["specpass"]["history"][-1]["n_matches"] == len(linears)
    # The weights are the model's own tensors, not copies.
    for name, p in cg.gm.named_parameters():
        assert gm.get_parameter(name) is p


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("q", [1, 2, 5])
def test_linear_operand_order_matches_eager(tiny, arch, q):
    t = tiny(arch)
    gm = run_passes(t.cg.gm, (linear_operand_order,), t.cg.structure)
    ids = torch.randint(0, t.vocab, (1, q), generator=torch.Generator().manual_seed(q))
    # The same dot products summed in another order inside the BLAS kernel: equal up to float rounding.
    assert_same_outputs(t, t.cg.gm, gm, ids)


def test_linear_operand_order_leaves_weights_off_the_cpu_alone(tiny):
    cg = tiny("llama").cg
    gm, node_map = clone_graph_module(cg.gm)
    for node in _weight_linears(gm):  # as if the model lived on another device
        w = node.args[1]
        w.meta["val"] = torch.empty(tuple(w.meta["val"].shape), device="meta")
    result = linear_operand_order(gm, remap(cg.structure, node_map), None)
    assert not result.modified and result.n_matches == 0
    assert normalize(gm) == normalize(cg.gm)


@pytest.fixture
def measured_orders(tmp_path, monkeypatch):
    """The fp32 order timed for weights of any size, into a choices.json of this test's own; returns the shapes
    timed (a fake ``_time_orders`` gives (linear, W @ x.T) ms from ``times``)."""
    from specpass.kernels import choice

    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    monkeypatch.setattr(choice, "choices_path", lambda: tmp_path / "choices.json")
    monkeypatch.setattr(choice, "ORDER_MIN_BYTES", 0)
    monkeypatch.setattr(choice, "_memo", {})
    timed: list[tuple] = []
    times = {"default": (2.0, 1.0)}

    def fake(weights, tokens):
        timed.append(tuple(weights[0].shape))
        return times.get(tuple(weights[0].shape), times["default"])

    monkeypatch.setattr(choice, "_time_orders", fake)
    return timed, times


def test_linear_operand_order_rewrites_only_the_shapes_where_it_is_faster(tiny, measured_orders):
    timed, times = measured_orders
    cg = tiny("llama").cg
    linears = _weight_linears(cg.gm)
    shapes = {tuple(n.args[1].meta["val"].shape) for n in linears}
    slower = next(s for s in shapes if s[0] != s[1])  # W @ x.T loses for this shape only
    times[slower] = (1.0, 3.0)
    gm = run_passes(cg.gm, (linear_operand_order,), cg.structure)
    assert sorted(timed) == sorted(shapes)  # each shape once, over all its matrices
    kept = [n for n in linears if tuple(n.args[1].meta["val"].shape) == slower]
    assert op_counts(gm)[LINEAR] == len(kept) > 0
    assert op_counts(gm)[MM] == op_counts(cg.gm)[MM] + len(linears) - len(kept)
    recorded = gm.meta["specpass"]["operand_order"]
    assert recorded[f"order|few_tokens|{slower[0]}x{slower[1]}"] == {
        "kind": f"order|few_tokens|{slower[0]}x{slower[1]}",
        "linear_ms": 1.0,
        "stationary_ms": 3.0,
        "stationary": False,
    }
    assert sum(r["stationary"] for r in recorded.values()) == len(shapes) - 1
    ids = torch.randint(0, tiny("llama").vocab, (1, 3), generator=torch.Generator().manual_seed(0))
    assert_same_outputs(tiny("llama"), cg.gm, gm, ids)

    # cached on disk for this CPU: another process (a fresh memo) times nothing and decides the same
    from specpass.kernels import choice

    choice._memo.clear()
    timed.clear()
    again = run_passes(cg.gm, (linear_operand_order,), cg.structure)
    assert not timed and normalize(again) == normalize(gm)


def test_linear_operand_order_takes_given_orders_and_times_small_weights_never(tiny, measured_orders, monkeypatch):
    from specpass.kernels import choice

    timed, _ = measured_orders
    cg = tiny("llama").cg
    head = tuple(cg.structure.lm_head.args[1].meta["val"].shape)
    with choice.use_choices({choice.order_kind(head): False}):  # a snapshot's: linear for the head's shape
        gm = run_passes(cg.gm, (linear_operand_order,), cg.structure)
    same = [n for n in _weight_linears(cg.gm) if tuple(n.args[1].meta["val"].shape) == head]
    assert not timed and op_counts(gm)[LINEAR] == len(same) > 0
    monkeypatch.setattr(choice, "ORDER_MIN_BYTES", 1 << 40)  # every shape too small to time: weight-stationary
    gm = run_passes(cg.gm, (linear_operand_order,), cg.structure)
    assert not timed and op_counts(gm)[LINEAR] == 0
    assert all(r["linear_ms"] is None and r["stationary"] for r in gm.meta["specpass"]["operand_order"].values())


def test_stationary_faster_times_both_orders_here(tmp_path, monkeypatch):
    from specpass.kernels import choice

    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    monkeypatch.setattr(choice, "choices_path", lambda: tmp_path / "choices.json")
    monkeypatch.setattr(choice, "_memo", {})
    weights = [torch.randn(512, 256) for _ in range(3)]  # 1.5 MiB: above ORDER_MIN_BYTES
    result = choice.stationary_faster(weights)
    assert result["kind"] == "order|few_tokens|512x256"
    assert result["linear_ms"] > 0 and result["stationary_ms"] > 0
    assert result["stationary"] == (result["stationary_ms"] < result["linear_ms"])
    assert list(json.loads((tmp_path / "choices.json").read_text()).values()) == [result]


def test_the_kernels_fp32_time_is_the_faster_orders(monkeypatch):
    from specpass.kernels import choice

    monkeypatch.setattr(choice, "_kernel_pass", lambda calls, x: 0.5)
    monkeypatch.setattr(choice, "_linear_pass", lambda weights, x: 0.25 if x.shape[1] == 1 else 0.75)
    monkeypatch.setattr(choice, "_stationary_pass", lambda weights, x: 0.125 if x.shape[1] == 128 else 1.0)
    call = choice.Call((torch.empty(0),) * 5, 32, 4, [torch.randn(8, 32)])
    # one token: linear's 0.25; two: neither beats 0.75; a prefill tile: linear only (0.75, not 0.125)
    assert choice._time([call], (1, 2, 128)) == (1500.0, 1750.0)


# --------------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------------
def test_run_passes_records_history(tiny):
    cg = tiny("llama").cg
    gm = run_passes(cg.gm, (last_token_logits,), cg.structure)
    assert gm.meta["specpass"]["history"] == [{"pass": "last_token_logits", "modified": True, "n_matches": 1}]


def test_run_passes_names_the_failing_pass_and_those_before(tiny):
    cg = tiny("llama").cg

    def explode(gm, structure, cfg):
        raise RuntimeError("boom")

    with pytest.raises(
        SpecPassError, match=r"pass explode failed after \['last_token_logits'\]: RuntimeError: boom"
    ) as e:
        run_passes(cg.gm, (last_token_logits, explode), cg.structure)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_run_passes_rewraps_a_pass_spec_pass_error(tiny):
    cg = tiny("llama").cg

    def refuse(gm, structure, cfg):
        raise SpecPassError("expected 2 decoder layers, found 0")

    with pytest.raises(SpecPassError, match=r"^pass refuse failed after \[\]: expected 2 decoder layers, found 0$"):
        run_passes(cg.gm, (refuse,), cg.structure)


def test_run_passes_lints_after_each_pass(tiny):
    cg = tiny("llama").cg

    def break_topology(gm, structure, cfg):
        # Use a node before it is defined: a graph FX's lint rejects.
        output = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        first.args = (output.args[0][0], *first.args[1:])
        return PassResult(gm, True, 1)

    with pytest.raises(SpecPassError, match=r"pass break_topology failed after \['last_token_logits'\]"):
        run_passes(cg.gm, (last_token_logits, break_topology), cg.structure)


def test_run_passes_eliminates_dead_code(tiny):
    cg = tiny("llama").cg

    def add_unused(gm, structure, cfg):
        # structure's nodes belong to the captured graph; the pass works on a copy, so look them up by name.
        head = next(n for n in gm.graph.nodes if n.name == structure.lm_head.name)
        with gm.graph.inserting_before(head):
            gm.graph.call_function(torch.ops.aten.neg.default, (head.args[0],))
        return PassResult(gm, True, 1)

    gm = run_passes(cg.gm, (add_unused,), cg.structure)
    assert op_counts(gm) == op_counts(cg.gm)


# --------------------------------------------------------------------------------------------------------
# Draft passes: skip_layers, insert_early_exit, prune_lm_head. Oracle: the HF model with the same surgery
# done on its modules (forward hooks), and the target path left bit-identical.
# --------------------------------------------------------------------------------------------------------
INDEX_SELECT = torch.ops.aten.index_select.default


def hf_model_path(structure_path: str) -> str:
    return structure_path.removeprefix("model.")  # capture wraps the model as ``.model``


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


def surgery_logits(model, cg, ids, *, identity=(), zero=(), adapter_after=None, adapter=None, vocab_ids=None):
    """Eager reference: HF forward with layers turned into identities, sublayers zeroed, an adapter applied."""
    layers = model.get_submodule(hf_model_path(cg.structure.layers_path))
    hooks = []

    def identity_hook(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return _replace_first(out, hidden)

    def zero_hook(module, args, out):
        return _replace_first(out, torch.zeros_like(_first(out)))

    def adapter_hook(module, args, out):
        return _replace_first(out, adapter(_first(out)))

    for i in identity:
        hooks.append(layers[i].register_forward_hook(identity_hook, with_kwargs=True))
    for i, child in zero:
        hooks.append(getattr(layers[i], child).register_forward_hook(zero_hook))
    if adapter is not None:
        hooks.append(layers[adapter_after].register_forward_hook(adapter_hook))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    if vocab_ids is not None:
        full = torch.full_like(logits, float("-inf"))
        full[..., vocab_ids] = logits[..., vocab_ids]
        logits = full
    return logits


def draft_logits(t, cfg, ids):
    gm = run_passes(t.cg.gm, draft_pipeline(cfg), t.cg.structure, cfg)
    return run_program(gm, t.cg.spec, ids)[0], gm


def _ids(t, q=7):
    return torch.randint(0, t.vocab, (1, q), generator=torch.Generator().manual_seed(1))


def _layer_op_counts(t, i):
    from specpass.structure import nodes_by_layer

    return collections.Counter(n.target for n in nodes_by_layer(t.cg.gm, t.cg.structure.layers_path)[i])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_skip_layers_op_counts(tiny, arch):
    t = tiny(arch)
    cfg = DraftConfig(skip_layers=(1,))
    gm = run_passes(t.cg.gm, (skip_layers,), t.cg.structure, cfg)
    removed = op_counts(t.cg.gm) - op_counts(gm)
    assert op_counts(gm) - op_counts(t.cg.gm) == collections.Counter()
    layer_ops = _layer_op_counts(t, 1)
    # The whole layer goes, its two KV writes and its attention included.
    assert removed == layer_ops
    assert removed[INDEX_COPY] == 2 and removed[SDPA] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("skip", [(0,), (1,)])
def test_skip_layers_matches_eager(tiny, arch, skip):
    t = tiny(arch)
    ids = _ids(t)
    got, _ = draft_logits(t, DraftConfig(skip_layers=skip), ids)
    torch.testing.assert_close(got, surgery_logits(t.model, t.cg, ids, identity=skip), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "attn", "mlp"), [("llama", "self_attn", "mlp"), ("gpt2", "attn", "mlp")])
def test_skip_layers_sublayers_match_eager(tiny, arch, attn, mlp):
    t = tiny(arch)
    ids = _ids(t)
    got, gm = draft_logits(t, DraftConfig(skip_attention=(0,), skip_mlp=(1,)), ids)
    want = surgery_logits(t.model, t.cg, ids, zero=[(0, attn), (1, mlp)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # One layer's attention left (the draft pipeline fuses it: fused_attention).
    attention = lambda g: op_counts(g)[SDPA] + op_counts(g)[SOFTMAX] + op_counts(g)[FUSED]  # noqa: E731
    assert attention(t.cg.gm) == 2 and attention(gm) == 1
    assert len(tagged(gm, "skip_layers")) == 2  # one zeros_like per skipped sublayer


def test_skip_layers_errors_name_what_is_wrong(tiny):
    t = tiny("llama")
    for cfg, message in [
        (DraftConfig(), "nothing to skip"),
        (DraftConfig(skip_layers=(5,)), "out of range"),
        (DraftConfig(skip_layers=(0, 1)), "all 2 layers"),
    ]:
        with pytest.raises(SpecPassError, match=message):
            run_passes(t.cg.gm, (skip_layers,), t.cg.structure, cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_insert_early_exit_op_counts(tiny, arch):
    t = tiny(arch)
    gm = run_passes(t.cg.gm, (insert_early_exit,), t.cg.structure, DraftConfig(exit_layer=0))
    assert op_counts(gm) - op_counts(t.cg.gm) == collections.Counter()
    assert op_counts(t.cg.gm) - op_counts(gm) == _layer_op_counts(t, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_insert_early_exit_matches_eager_with_and_without_adapter(tiny, arch):
    from specpass.tune.adapter import ExitAdapter

    t = tiny(arch)
    ids = _ids(t)
    hidden = t.model.get_input_embeddings().weight.shape[1]
    got, _ = draft_logits(t, DraftConfig(exit_layer=0), ids)
    torch.testing.assert_close(got, surgery_logits(t.model, t.cg, ids, identity=(1,)), rtol=1e-4, atol=1e-4)

    torch.manual_seed(3)
    adapter = ExitAdapter(hidden, rank=4)
    torch.nn.init.normal_(adapter.up.weight, std=0.5)  # not the identity it starts as
    got, gm = draft_logits(t, DraftConfig(exit_layer=0, adapter=adapter), ids)
    want = surgery_logits(t.model, t.cg, ids, identity=(1,), adapter_after=0, adapter=adapter)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [n.op for n in tagged(gm, "insert_early_exit")] == ["call_module"]
    assert not torch.allclose(got, draft_logits(t, DraftConfig(exit_layer=0), ids)[0])


def test_insert_early_exit_errors_name_what_is_wrong(tiny):
    t = tiny("llama")
    with pytest.raises(SpecPassError, match="no exit layer"):
        run_passes(t.cg.gm, (insert_early_exit,), t.cg.structure, DraftConfig())
    with pytest.raises(SpecPassError, match=r"exit layer 1 must lie in \[0, 0\]"):
        run_passes(t.cg.gm, (insert_early_exit,), t.cg.structure, DraftConfig(exit_layer=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_prune_lm_head_op_counts_and_weights(tiny, arch):
    t = tiny(arch)
    ids = torch.tensor([3, 5, 8, 13, 21])
    gm = run_passes(t.cg.gm, (prune_lm_head,), t.cg.structure, DraftConfig(vocab_ids=ids))
    added = op_counts(gm) - op_counts(t.cg.gm)
    assert added == collections.Counter(
        {SLICE: 1, torch.ops.aten.full_like.default: 1, torch.ops.aten.cat.default: 1, INDEX_SELECT: 1}
    )
    assert op_counts(t.cg.gm) - op_counts(gm) == collections.Counter()
    head_weight = t.model.get_output_embeddings().weight
    torch.testing.assert_close(gm.specpass_draft_head_weight, head_weight[ids], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_prune_lm_head_matches_eager(tiny, arch):
    t = tiny(arch)
    ids = _ids(t)
    keep = torch.randperm(t.vocab, generator=torch.Generator().manual_seed(2))[:20]
    got, _ = draft_logits(t, DraftConfig(vocab_ids=keep), ids)
    want = surgery_logits(t.model, t.cg, ids, vocab_ids=keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(got[0].argmax(-1).tolist()) <= set(keep.tolist())


def test_prune_lm_head_errors_name_what_is_wrong(tiny):
    t = tiny("llama")
    for ids, message in [(None, "no token ids"), (torch.tensor([1, 1]), "distinct"), (torch.tensor([999]), "distinct")]:
        with pytest.raises(SpecPassError, match=message):
            run_passes(t.cg.gm, (prune_lm_head,), t.cg.structure, DraftConfig(vocab_ids=ids))


# --------------------------------------------------------------------------------------------------------
# exit_predictions
# --------------------------------------------------------------------------------------------------------
ARGMAX = torch.ops.aten.argmax.default


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_exit_predictions_op_counts(tiny, arch):
    """One copy of the final norm and head per exit, then an argmax; pruned rows add an index_select per
    head operand and an index back to token ids."""
    t = tiny(arch)
    tail = collections.Counter(n.target for n in _head_nodes(t))
    gm = run_passes(t.cg.gm, (exit_predictions,), t.cg.structure, DraftConfig(exits=(0,)))
    assert op_counts(gm) - op_counts(t.cg.gm) == tail + collections.Counter({ARGMAX: 1})
    assert op_counts(t.cg.gm) - op_counts(gm) == collections.Counter()
    cfg = DraftConfig(exits=(0,), vocab_ids=torch.tensor([3, 5, 8]))
    pruned = run_passes(t.cg.gm, (exit_predictions,), t.cg.structure, cfg)
    operands = 1 + (t.model.get_output_embeddings().bias is not None)
    extra = collections.Counter({ARGMAX: 1, INDEX_SELECT: operands, torch.ops.aten.index.Tensor: 1})
    assert op_counts(pruned) - op_counts(t.cg.gm) == tail + extra


def _head_nodes(t) -> list[torch.fx.Node]:
    from specpass.passes.exit_predictions import _head_tail

    return _head_tail(t.cg.gm, t.cg.structure)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_exit_predictions_match_the_early_exit_draft(tiny, arch):
    """Exit k's tokens are the argmax of the early-exit draft at k, and the logits are decode's, bit for bit."""
    t = tiny(arch)
    ids = _ids(t)
    decode = run_passes(t.cg.gm, PIPELINES["decode"], t.cg.structure)
    for vocab_ids in (None, torch.randperm(t.vocab, generator=torch.Generator().manual_seed(4))[:20]):
        cfg = DraftConfig(exits=(0,), vocab_ids=vocab_ids)
        gm = run_passes(t.cg.gm, PIPELINES["verify_exits"], t.cg.structure, cfg)
        logits, tokens = run_program(gm, t.cg.spec, ids)[0]
        assert torch.equal(logits, run_program(decode, t.cg.spec, ids)[0])
        draft, _ = draft_logits(t, DraftConfig(exit_layer=0, vocab_ids=vocab_ids), ids)
        assert tokens.dtype == torch.long and torch.equal(tokens, draft.argmax(-1))
        assert not torch.equal(tokens, logits.argmax(-1)), "exit 0 should disagree with the target somewhere"


def test_exit_predictions_errors_name_what_is_wrong(tiny):
    t = tiny("llama")
    with pytest.raises(SpecPassError, match="no exit layers"):
        run_passes(t.cg.gm, (exit_predictions,), t.cg.structure, DraftConfig())
    with pytest.raises(SpecPassError, match=r"exits \[1\] must be distinct layers in \[0, 0\]"):
        run_passes(t.cg.gm, (exit_predictions,), t.cg.structure, DraftConfig(exits=(1,)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_draft_passes_leave_the_target_path_bit_identical(tiny, arch):
    t = tiny(arch)
    ids = _ids(t)
    verify = run_passes(t.cg.gm, PIPELINES["decode"], t.cg.structure)
    before_text, before = normalize(verify), run_program(verify, t.cg.spec, ids)[0]
    cfg = DraftConfig(exit_layer=0, skip_mlp=(0,), vocab_ids=torch.arange(0, t.vocab, 3))
    draft_logits(t, cfg, ids)
    verify = run_passes(t.cg.gm, PIPELINES["decode"], t.cg.structure)
    assert normalize(verify) == before_text
    assert torch.equal(run_program(verify, t.cg.spec, ids)[0], before)
    assert torch.equal(t.model.get_output_embeddings().weight, t.model.get_output_embeddings().weight.clone())


def test_draft_pipeline_keeps_only_the_configured_passes():
    names = lambda cfg: [p.__name__ for p in draft_pipeline(cfg)]  # noqa: E731
    assert names(DraftConfig(exit_layer=3)) == [
        "fold_gqa_heads",
        "fused_attention",
        "inline_attention",
        "insert_early_exit",
        "exact_lowbit",
        "linear_operand_order",
    ]
    assert names(DraftConfig(skip_layers=(1,), vocab_ids=torch.arange(4))) == [
        "fold_gqa_heads",
        "fused_attention",
        "inline_attention",
        "skip_layers",
        "prune_lm_head",
        "exact_lowbit",
        "linear_operand_order",
    ]


# --------------------------------------------------------------------------------------------------------
# exact_lowbit (tests/test_exact_lowbit.py has the formats, the kernels and a grid model end to end)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_exact_lowbit_leaves_weights_off_a_grid_unchanged(tiny, arch):
    cg = tiny(arch).cg
    before = run_passes(cg.gm, PIPELINES["decode"][:1], cg.structure)
    after = run_passes(cg.gm, (*PIPELINES["decode"][:1], exact_lowbit), cg.structure)
    assert after.meta["specpass"]["history"][-1] == {"pass": "exact_lowbit", "modified": False, "n_matches": 0}
    assert normalize(after) == normalize(before)


# --------------------------------------------------------------------------------------------------------
# tree_verify
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_tree_verify_proves_every_attention_and_changes_nothing(tiny, arch):
    t = tiny(arch)
    decode = run_passes(t.cg.gm, PIPELINES["decode"], t.cg.structure)
    verify = run_passes(t.cg.gm, PIPELINES["verify"], t.cg.structure)
    record = verify.meta["specpass"]["history"][-1]
    assert record == {"pass": "tree_verify", "modified": False, "n_matches": len(t.cg.structure.layers)}
    assert op_counts(verify) == op_counts(decode) and normalize(verify) == normalize(decode)


def _rewired(t, edit):
    """A copy of the captured graph with ``edit(gm, structure)`` applied, and its remapped structure."""
    gm, node_map = clone_graph_module(t.cg.gm)
    structure = remap(t.cg.structure, node_map)
    edit(gm, structure)
    gm.recompile()
    return gm, structure


def test_tree_verify_refuses_causal_attention(tiny):
    def causal(gm, structure):
        sdpa = structure.layers[1].attention[0]
        sdpa.args = (*sdpa.args[:3], None)
        sdpa.kwargs = {**sdpa.kwargs, "is_causal": True}

    gm, structure = _rewired(tiny("llama"), causal)
    with pytest.raises(SpecPassError, match=r"tree_verify: attention .*layers\.1.* is_causal=True"):
        tree_verify(gm, structure)


def test_tree_verify_refuses_positions_read_from_cache_slots(tiny):
    """A model whose rotary angles come from the write slots would place tree nodes by slot, not depth."""

    def slots_as_positions(gm, structure):
        for user in list(structure.position_ids.users):
            user.replace_input_with(structure.position_ids, structure.cache_position)

    gm, structure = _rewired(tiny("llama"), slots_as_positions)
    with pytest.raises(SpecPassError, match="cache_position"):
        tree_verify(gm, structure)
