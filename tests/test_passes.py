"""Passes and the pass manager: op counts, numerics against eager, the manager's invariants and errors.

Every pass in ``specpass.passes.PIPELINES`` needs here at least one ``test_<pass>_*`` test and in
``tests/goldens/<pass>/`` at least one golden; ``test_every_pass_has_tests_and_goldens`` enforces it.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from conftest import GOLDENS

from specpass.capture import example_inputs
from specpass.errors import SpecPassError
from specpass.graph_text import normalize
from specpass.passes import PIPELINES, PassResult, clone_graph_module, fold_gqa_heads, last_token_logits, run_passes
from specpass.passes.manager import remap

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
        assert sorted(folder.glob("*.txt")), f"no goldens in {folder} (run pytest with --update-goldens)"
    # And the other way round: no golden folder outlives its pass.
    stale = sorted(d.name for d in GOLDENS.iterdir() if d.is_dir() and d.name not in {"capture", *all_passes()})
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
    # The prefill program still writes the whole prompt's K/V (only the head was cut).
    for a, b in zip(full_kv, last_kv, strict=True):
        assert torch.equal(a, b)


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
    ref_logits, ref_kv = run_program(cg.gm, cg.spec, ids)
    logits, kv = run_program(folded, cg.spec, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits, t.model(ids).logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(ref_kv, kv, strict=True):
        assert torch.equal(a, b)


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
