"""CUDA-graph replay (runtime/cuda_graphs.py) and the GPU decode loop's deferred host syncs, on the CPU.

Off CUDA, ``GraphedProgram`` keeps a graph's bookkeeping (static input buffers per bucket, outputs overwritten
by the next replay) without capturing, so these tests meet the aliasing hazards a real graph has. The GPU
check (examples/gpu_check.py) runs the same loops with real graphs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sample_three, sampling_model
from test_speculative import PLANS, _hf, _sharpened

import specpass
from specpass.runtime import generate as generate_module
from specpass.runtime.cuda_graphs import GraphedProgram
from specpass.runtime.generate import WINDOW_BUCKET, tree_bucket
from specpass.runtime.sampling import SamplingConfig
from specpass.runtime.tree import DraftTree
from specpass.tune.plan import SpecPlan

pytestmark = pytest.mark.compat

#: a chain draft (the target without layer 1's MLP) that the threshold cuts short now and then, and that is
#: accepted often: the deferred cut is exercised
THRESHOLDED = SpecPlan(speculate=True, skip_mlp=[1], max_draft=4, threshold=0.05, adaptive=False)
GRAPH_PLANS = {
    "plain": None,
    "thresholded": THRESHOLDED,
    "lookup_then_exit": PLANS["lookup_then_exit"],
    "tree_eagle2": PLANS["tree_eagle2"],
    "del": PLANS["del"],
}


@pytest.fixture
def gpu_loop(monkeypatch):
    """The decode loops as they run on a GPU: draft chains read back once per round."""
    monkeypatch.setattr(generate_module, "defer_draft_sync", lambda device: True)


def _compiled(arch: str, plan: SpecPlan | None, graphs: bool):
    model = _sharpened(arch)
    sm = specpass.optimize(
        model, speculate=plan is not None, plan=plan, backend="eager", max_cache_len=160, progress=False
    )
    sm.cuda_graphs = graphs
    return model, sm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("plan", sorted(GRAPH_PLANS))
def test_graphed_programs_generate_hf_tokens(arch, plan, gpu_loop):
    model, sm = _compiled(arch, GRAPH_PLANS[plan], graphs=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    # 70 + 12 tokens cross a mask-width bucket (64): a second graph per token count
    for seed, (plen, n) in enumerate([(5, 30), (70, 12)]):
        ids = torch.randint(0, vocab, (1, plen), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sm.generate(ids, max_new_tokens=n, eos_token_id=[]), _hf(model, ids, n)), (plan, seed)
    graphed = sm.runnable_programs()
    assert graphed["prefill"] is sm.programs["prefill"]  # any prompt length: never captured
    buckets = [key for name, g in graphed.items() if name != "prefill" for key in g.buckets]
    assert {w for _, w in buckets} == {WINDOW_BUCKET, 2 * WINDOW_BUCKET}
    assert all(q <= 1 + max(PLANS["tree_eagle2"].tree_budget, 4) for q, _ in buckets)
    if plan == "tree_eagle2":  # verified trees come padded to a power of two of nodes: one graph per bucket
        assert {q for q, _ in graphed["decode"].buckets} <= {1, 2, 4, 8}


def test_tree_padding_fills_with_new_root_children_within_the_limits():
    tree = DraftTree(7, budget=8, max_depth=3)
    tree.add_path([1, 2])
    assert tree_bucket(len(tree), tree.budget) == 4
    tree.pad(4, vocab=64)
    assert tree.tokens == [7, 1, 2, 0] and tree.parents == [-1, 0, 1, 0]
    tree.pad(16, vocab=64)  # no further than the budget; token 1 is a child already
    assert tree.tokens == [7, 1, 2, 0, 2, 3, 4, 5] and tree_bucket(5, 8) == 8 and tree_bucket(1, 8) == 1
    small = DraftTree(1, budget=8, max_depth=2)
    small.pad(8, vocab=3)  # no token ids outside the vocabulary
    assert small.tokens == [1, 0, 1, 2]
    rootless = DraftTree(1, budget=8, max_depth=0)  # the request's last token: no room below the root
    rootless.pad(8, vocab=64)
    assert len(rootless) == 1


def test_deferred_draft_sync_drafts_and_accepts_what_the_per_token_loop_does(monkeypatch):
    """The GPU loop drafts the whole budget and cuts at the first unsure token afterwards: the same drafts,
    the same acceptance, the same output as stopping there."""
    model, sm = _compiled("llama", THRESHOLDED, graphs=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    runs = {}
    for deferred in (False, True):
        monkeypatch.setattr(generate_module, "defer_draft_sync", lambda device, d=deferred: d)
        out = sm.generate(ids, max_new_tokens=40, eos_token_id=[])
        runs[deferred] = (out, sm.last_stats.drafted, sm.last_stats.accepted, sm.last_stats.steps)
    assert torch.equal(runs[True][0], _hf(model, ids, 40))
    assert runs[True][1:] == runs[False][1:]
    drafted, accepted = runs[True][1], runs[True][2]
    assert 0 < drafted[-1] < drafted[0], "the threshold never cut a draft short: the test proves nothing"
    assert accepted[-1] > 0


def test_graphed_sampling_draws_what_ungraphed_sampling_draws():
    """Graphs change where a step's inputs and outputs live, not what it computes: the same generator seed
    samples the same tokens (the chi-square tests of tests/test_speculative.py cover the distribution)."""
    model = sampling_model()
    cfg = SamplingConfig(do_sample=True, temperature=0.9, top_k=6, top_p=0.95)
    for plan in (PLANS["early_exit"], PLANS["tree_eagle2"]):
        outs = []
        for graphs in (False, True):
            sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=32, progress=False)
            sm.cuda_graphs = graphs
            g = torch.Generator().manual_seed(7)
            outs.append(torch.cat([sample_three(sm, torch.tensor([[1, 2, 3]]), cfg, g) for _ in range(20)]))
        assert torch.equal(outs[0], outs[1])


def test_a_replay_overwrites_the_last_output_of_its_bucket():
    calls = []

    def program(ids, pos, slots, mask, k):
        calls.append(int(ids[0, 0]))
        return ids.float() * 2

    graphed = GraphedProgram(program, 4)
    kv = torch.zeros(3)
    mask = torch.zeros(1, 1, 1, 64)
    first = graphed(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]), mask, kv)
    assert first.tolist() == [[2.0]]
    second = graphed(torch.tensor([[5]]), torch.tensor([[1]]), torch.tensor([1]), mask, kv)
    assert second is first and first.tolist() == [[10.0]]  # a graph's output is static: the caller must copy
    other = graphed(torch.tensor([[4, 6]]), torch.tensor([[1, 2]]), torch.tensor([1, 2]), torch.zeros(1, 1, 2, 64), kv)
    assert other is not first and sorted(graphed.buckets) == [(1, 64), (2, 64)]
    with pytest.raises(RuntimeError, match="another KV cache"):
        graphed(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]), mask, torch.zeros(3))


def test_graphs_that_size_tensors_by_their_data_are_not_graphed():
    """A program whose shapes depend on its data (nonzero(): MoE routing) waits on the host, which a CUDA
    graph cannot capture: CompiledLM runs it as it is (cuda_graphs.waits_on_host)."""
    from specpass.runtime.cuda_graphs import waits_on_host

    class Routed(torch.nn.Module):
        def forward(self, x):
            return x[x.nonzero()[:, 0]].sum(0)

    class Dense(torch.nn.Module):
        def forward(self, x):
            return x.relu().sum(0)

    x = torch.tensor([0.0, 1.0, 2.0])
    assert waits_on_host(torch.export.export(Routed(), (x,)).module())
    assert not waits_on_host(torch.export.export(Dense(), (x,)).module())
    model = _sharpened("llama")
    sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    sm.cuda_graphs = True
    assert isinstance(sm.runnable_programs()["decode"], GraphedProgram)
    sm.programs["decode"].waits_on_host = True
    assert sm.runnable_programs()["decode"] is sm.programs["decode"]
