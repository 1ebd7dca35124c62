"""Draft trees: one verify pass over a token tree scores every branch as if it ran alone, on eight
architectures (two with a sliding window the tree crosses, one with ALiBi); the accepted path's K/V is compacted into the
committed cache; Sequoia's tree search; the recycled-token table; greedy and sampled tree decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import chi2_pvalue, negative_control_pvalue, sample_three, sampling_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specpass
from specpass.cache_spec import FULL, SLIDING, CacheSpec
from specpass.errors import SpecPassError
from specpass.runtime import generate as generate_module
from specpass.runtime.generate import _run, _run_tree
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.lookup import NgramIndex
from specpass.runtime.recycle import AdjacencyTable, chain_template
from specpass.runtime.sampling import SamplingConfig, probabilities
from specpass.runtime.tree import DraftTree, accept_tree
from specpass.tiny_models import SLIDING_WINDOW, build_tiny_model
from specpass.tune.plan import SpecPlan
from specpass.tune.tree_shape import best_tree

#: eight architectures; mistral's and gpt_neo's (local layers) tiny configs have a sliding window of
#: SLIDING_WINDOW tokens, and the prompts below are longer than it, so the tree's masks must apply the window by
#: depth, not by slot; bloom's ALiBi bias must count positions by depth too
TREE_ARCHS = ["llama", "mistral", "qwen3", "gemma", "gpt2", "gpt_neox", "bloom", "gpt_neo"]
CAPACITY = 32


@pytest.fixture(scope="module")
def verify_programs():
    """arch -> (tiny model, its compiled eager verify program, cache spec), built once."""
    made = {}

    def get(arch):
        if arch not in made:
            model = build_tiny_model(arch)
            sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=CAPACITY, progress=False)
            made[arch] = (model, sm.programs["decode"], sm.spec)
        return made[arch]

    return get


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch", TREE_ARCHS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_tree_verify_equals_each_branch_then_compacts(verify_programs, arch, data):
    model, program, spec = verify_programs(arch)
    if arch == "mistral":
        assert spec.sliding_window == SLIDING_WINDOW, "the window this test means to cross"
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = st.integers(0, vocab - 1)
    prefix = data.draw(st.lists(tokens, min_size=SLIDING_WINDOW + 2, max_size=12), label="prefix")
    n = data.draw(st.integers(1, 9), label="nodes")
    parents = [-1] + [data.draw(st.integers(0, i - 1), label="parent") for i in range(1, n)]
    tree = DraftTree(prefix[-1], budget=n, max_depth=n)
    for i in range(1, n):
        # add() merges an equal sibling into an existing node; the tree then simply has fewer nodes.
        tree.add(min(parents[i], len(tree) - 1), data.draw(tokens, label="token"))

    cache = KVCache(spec)
    with torch.no_grad():
        _run(program, cache, torch.tensor([prefix[:-1]]))
        cache.commit(len(prefix) - 1)
        logits = _run_tree(program, cache, tree)[0]
    branch = [prefix + [tree.tokens[a] for a in tree.path_to(i)] for i in range(len(tree))]
    for i in range(len(tree)):
        torch.testing.assert_close(logits[i], _hf_logits(model, branch[i]), atol=1e-4, rtol=1e-4)

    # Accept one root-to-node path; the cache must then hold exactly prefix + path.
    leaf = data.draw(st.integers(0, len(tree) - 1), label="accepted")
    path = tree.path_to(leaf)
    cache.compact([cache.length + a for a in (0, *path)])
    assert cache.length == len(branch[leaf])
    nxt = data.draw(tokens, label="next")
    with torch.no_grad():
        got = _run(program, cache, torch.tensor([[nxt]]))[0, -1]
    torch.testing.assert_close(got, _hf_logits(model, branch[leaf] + [nxt]), atol=1e-4, rtol=1e-4)


def test_draft_tree_merges_prefixes_and_keeps_limits():
    tree = DraftTree(7, budget=6, max_depth=3)
    tree.add_path([1, 2, 3, 4])  # depth limit: 3 nodes
    tree.add_path([1, 2, 5])  # shares 1, 2
    tree.add_path([9, 9])  # budget: only one more node fits
    assert tree.tokens == [7, 1, 2, 3, 5, 9]
    assert tree.parents == [-1, 0, 1, 2, 2, 0]
    assert tree.depth == [0, 1, 2, 3, 3, 1]
    assert tree.path_to(4) == [1, 2, 4] and tree.max_depth == 3
    anc = tree.ancestors()
    assert anc[4].tolist() == [True, True, True, False, True, False]
    assert anc[5].tolist() == [True, False, False, False, False, True]


def test_tree_masks_by_depth_and_window():
    cache = KVCache(CacheSpec.uniform(1, 1, 2, 16, torch.float32, (FULL, SLIDING), 3))
    cache.commit(4)
    tree = DraftTree(0, budget=8, max_depth=4)
    tree.add(0, 9)  # node 1: a sibling of node 2
    tree.add_path([1, 2, 3, 4])  # nodes 2..5 at depths 1..4
    full, sliding = cache.tree_masks(tree.ancestors(), torch.tensor(tree.depth), width=12)
    visible = (full[0, 0] == 0).tolist()
    # Node i sits at slot 4 + i and sees the prefix, its ancestors and itself, never a sibling's branch.
    assert visible[1] == [s < 4 or s in (4, 5) for s in range(12)]
    assert visible[5] == [s < 4 or s in (4, 6, 7, 8, 9) for s in range(12)]
    # Window 3 counts positions (4 + depth), not slots: node 5 is at position 8 and sees positions 6..8,
    # i.e. nodes 3..5 at slots 7..9; node 2 sits at slot 6 but at position 5, outside the window.
    window = (sliding[0, 0] == 0).tolist()
    assert window[5] == [s in (7, 8, 9) for s in range(12)]
    assert window[1] == [s in (3, 4, 5) for s in range(12)]


class _BigramDraft:
    """A draft program whose next-token law depends on the last token only; it records every call."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int):
        self.probs = torch.full((vocab, vocab), 1e-12)
        for token, row in table.items():
            for nxt, p in row.items():
                self.probs[token, nxt] = p
        self.calls = []

    def __call__(self, ids, positions, slots, mask, *kv):
        self.calls.append((ids[0].tolist(), positions[0].tolist(), slots.tolist(), (mask[0, 0] == 0).tolist()))
        return self.probs[ids].log()


#: root 0 -> {1: .5, 2: .3}; 1 -> {4: .6, 5: .4}; 2 -> {4: .9, 5: .1}; 4 -> {0: .7, 1: .2}
BIGRAMS = {0: {1: 0.5, 2: 0.3, 3: 0.2}, 1: {4: 0.6, 5: 0.4}, 2: {4: 0.9, 5: 0.1}, 4: {0: 0.7, 1: 0.2, 3: 0.1}}


def test_eagle2_tree_expands_the_most_confident_and_reranks():
    cache = KVCache(CacheSpec.uniform(1, 1, 2, 16, torch.float32, (FULL,), None))
    cache.commit(3)
    draft = _BigramDraft(BIGRAMS, vocab=6)
    tree = DraftTree(0, budget=6, max_depth=8)
    policy = generate_module.DraftPolicy(draft_topk=2, threshold=0.0)
    generate_module._draft_tree(draft, cache, tree, 3, policy)
    # Level 1 runs the root; level 2 its top-2 children 1, 2; level 3 the two most confident grandchildren,
    # 1->4 (.30) and 2->4 (.27), not 1->5 (.20). Each node sits at slot 3 + its scratch index, at position
    # 3 + depth, and sees the prefix and its own ancestors: 2->4 (slot 7) sees the root and 2 (slots 3, 5).
    assert [c[:3] for c in draft.calls] == [
        ([0], [3], [3]),
        ([1, 2], [4, 4], [4, 5]),
        ([4, 4], [5, 5], [6, 7]),
    ]
    assert draft.calls[2][3][1] == [s < 3 or s in (3, 5, 7) for s in range(len(draft.calls[2][3][1]))]
    # Rerank to the budget's 5 nodes: 1 (.5), 2 (.3), 1->4 (.3), 2->4 (.27), 1->4->0 (.21); 1->5 (.2) loses.
    paths = [[tree.tokens[n] for n in tree.path_to(node)] for node in range(1, len(tree))]
    assert paths == [[1], [2], [1, 4], [2, 4], [1, 4, 0]]
    assert cache.length == 3  # drafting commits nothing


def test_eagle2_tree_stops_below_the_threshold_and_k1_is_a_chain():
    cache = KVCache(CacheSpec.uniform(1, 1, 2, 16, torch.float32, (FULL,), None))
    draft = _BigramDraft(BIGRAMS, vocab=6)
    tree = DraftTree(0, budget=8, max_depth=8)
    generate_module._draft_tree(draft, cache, tree, 3, generate_module.DraftPolicy(draft_topk=2, threshold=0.35))
    assert len(draft.calls) == 2  # level 2's best path (.30) is below 0.35: no third level
    assert sorted(tree.tokens[1:]) == [1, 2, 4, 4, 5, 5]
    draft.calls.clear()
    tree = DraftTree(0, budget=8, max_depth=8)
    generate_module._draft_tree(draft, cache, tree, 3, generate_module.DraftPolicy(draft_topk=1, threshold=0.0))
    assert [c[0] for c in draft.calls] == [[0], [1], [4]] and tree.tokens == [0, 1, 4, 0]


def test_greedy_tree_acceptance_walks_the_argmax():
    tree = DraftTree(0, budget=8, max_depth=4)
    tree.add_path([1, 2, 3])
    tree.add_path([4, 5])
    logits = torch.full((len(tree), 8), -1.0)
    for node, best in {0: 4, 1: 2, 4: 5, 5: 7}.items():  # root -> 4 -> 5, then 7 is not a child
        logits[node, best] = 1.0
    path, bonus = accept_tree(tree, logits, SamplingConfig())
    assert [tree.tokens[n] for n in path] == [4, 5] and bonus == 7


# --------------------------------------------------------------------------------------------------------
# Sequoia's tree search
# --------------------------------------------------------------------------------------------------------
def _tree_value(template, accept) -> float:
    reach, depth, total = [1.0], [0], 0.0
    for parent, rank in template:
        d = depth[parent]
        p = accept[d][rank] if d < len(accept) and rank < len(accept[d]) else 0.0
        reach.append(reach[parent] * p)
        depth.append(d + 1)
        total += reach[-1]
    return total


def _all_templates(n: int, ranks: int):
    """Every tree of exactly n nodes whose children take ranks 0, 1, ... in order (brute force)."""
    if n == 1:
        yield []
        return
    for smaller in _all_templates(n - 1, ranks):
        for parent in range(n - 1):
            used = sum(1 for p, _ in smaller if p == parent)
            if used < ranks:
                yield [*smaller, (parent, used)]


@pytest.mark.parametrize("budget", [1, 2, 4, 6])
def test_sequoia_dp_matches_brute_force(budget):
    accept = [[0.6, 0.2, 0.1], [0.5, 0.25, 0.1], [0.4, 0.3, 0.05]]
    template, value = best_tree(accept, budget)
    assert len(template) <= budget - 1
    assert _tree_value(template, accept) == pytest.approx(value)
    best = max(_tree_value(t, accept) for n in range(1, budget + 1) for t in _all_templates(n, 3))
    assert value == pytest.approx(best)
    for i, (parent, _) in enumerate(template, start=1):
        assert parent < i  # breadth-first: a parent is placed before its children


def test_sequoia_prefers_width_when_the_top_rank_is_unsure():
    chain, _ = best_tree([[0.9, 0.05]] * 4, 4)
    wide, _ = best_tree([[0.3, 0.3, 0.3]] * 4, 4)
    assert chain == chain_template(3)
    assert wide == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(SpecPassError, match="budget"):
        best_tree([[0.5]], 0)


# --------------------------------------------------------------------------------------------------------
# Recycled tokens and lookup branches
# --------------------------------------------------------------------------------------------------------
def test_adjacency_table_grows_a_template_and_records_ranks():
    table = AdjacencyTable(k=2)
    logits = torch.zeros(3, 10)
    logits[0, [5, 6]] = torch.tensor([2.0, 1.0])  # after 1: 5, then 6
    logits[1, [7, 8]] = torch.tensor([2.0, 1.0])  # after 5: 7, then 8
    logits[2, [9, 1]] = torch.tensor([2.0, 1.0])  # after 6: 9, then 1
    table.update([1, 5, 6], logits)
    tree = DraftTree(1, budget=10, max_depth=5)
    tree.add_path([5, 8])  # from lookup: the template shares node 5
    table.grow(tree, [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)])  # (3, 0): after 7, which has no entry
    assert tree.tokens == [1, 5, 8, 6, 7, 9]
    assert tree.parents == [-1, 0, 1, 0, 1, 3]
    hits, tries = [[0, 0] for _ in range(3)], [0, 0, 0]
    table.record([1, 6, 2, 4], hits, tries)  # 6 is rank 1 after 1; 2 is not after 6; 4 has no entry
    assert tries == [1, 1, 1] and hits == [[0, 1], [0, 0], [0, 0]]


def test_adjacency_table_state_round_trip():
    table = AdjacencyTable(k=4)
    table.update([3, 7], torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]]))
    table.next[9] = [2, 1]  # calibration replays rows of fewer candidates
    state = table.state_dict()
    assert state["next"].shape == (3, 4)
    other = AdjacencyTable(k=4)
    other.load_state_dict(state)
    assert other.next == table.next == {3: [5, 4, 3, 2], 7: [0, 1, 2, 3], 9: [2, 1]}
    with pytest.raises(SpecPassError, match="tokens"):
        other.load_state_dict({"tokens": state["tokens"], "next": state["next"][:2]})
    small = AdjacencyTable(k=8)  # a vocabulary smaller than k
    small.update([0], torch.zeros(1, 3))
    assert len(small.next[0]) == 3


def test_lookup_proposes_several_branches():
    index = NgramIndex([1, 2, 3, 9, 1, 2, 4, 5, 2, 6], max_n=2, min_n=1, keep=2)
    index.extend([1, 2])
    # "1 2" followed by 4 (latest) and by 3; then "2" alone: followed by 6 (latest) and by 4 (already there).
    assert index.propose_many(2, 4) == [[4, 5], [3, 9], [6, 1]]
    assert index.propose(3) == [4, 5, 2]


# --------------------------------------------------------------------------------------------------------
# Decoding with trees
# --------------------------------------------------------------------------------------------------------
def test_tree_decoding_accepts_recycled_tokens_on_a_repeating_model():
    """Sharpened random weights fall into a cycle; once the table has seen it, recycled trees accept it."""
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    template, _ = best_tree([[0.7, 0.2]] * 4, 6)
    plan = SpecPlan(speculate=True, tree_budget=6, tree_template=[list(t) for t in template])
    sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=96, progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
    assert torch.equal(sm.generate(ids, max_new_tokens=60, eos_token_id=[]), want)
    stats = sm.last_stats
    assert stats.tau > 1.5 and stats.tree_nodes > stats.steps
    assert sum(map(sum, stats.rank_hits)) > 0 and all(
        h <= t for h, t in zip(map(sum, stats.rank_hits), stats.rank_tries, strict=True)
    )


def test_tree_plan_round_trips_and_describes_itself(tmp_path):
    plan = SpecPlan(speculate=True, lookup=2, lookup_branches=2, tree_budget=8, tree_template=[[0, 0], [0, 1]])
    plan.save(tmp_path / "p.json")
    again = SpecPlan.load(tmp_path / "p.json")
    assert again == plan and again.policy().tree_template == ((0, 0), (0, 1))
    assert "trees of up to 8 nodes" in again.describe() and again.drafts
    eagle = SpecPlan(speculate=True, exit_layer=1, max_draft=3, tree_budget=8, draft_topk=2)
    assert eagle.tree_draft and eagle.policy().draft_topk == 2
    assert "EAGLE-2 draft trees of depth 3 and top-2" in eagle.describe()
    assert eagle.draft_key() != SpecPlan(speculate=True, exit_layer=1).draft_key()  # a chain draft: one token
    with pytest.raises(SpecPassError, match="draft_topk must be an int >= 1"):
        SpecPlan(speculate=True, exit_layer=0, tree_budget=4, draft_topk=0).check(build_tiny_model("llama"))


# --------------------------------------------------------------------------------------------------------
# Sampling through trees
# --------------------------------------------------------------------------------------------------------
#: an 8-token model's trees: the top-3 recycled tokens at the root and one below the first; or EAGLE-2's
#: dynamic tree from an early exit after layer 0, top-5 per level (three sampled tokens leave room for one
#: level below the root, and five siblings give the chain-mask control below its power)
SAMPLING_PLANS = {
    "recycled": SpecPlan(speculate=True, tree_budget=5, tree_template=[[0, 0], [0, 1], [0, 2], [1, 0]]),
    "eagle2": SpecPlan(speculate=True, exit_layer=0, max_draft=2, threshold=0.0, tree_budget=6, draft_topk=5),
}


@pytest.fixture(scope="module", params=sorted(SAMPLING_PLANS))
def tree_sampling(request):
    model = sampling_model()
    plan = SAMPLING_PLANS[request.param]
    sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=16, progress=False)
    cfg = SamplingConfig(True, temperature=0.9, top_k=7, top_p=0.97)
    return model, sm, torch.tensor([[1, 2, 3]]), cfg


def _last_two_distribution(model, ids, cfg) -> torch.Tensor:
    """Exact joint law of the second and third sampled tokens, flattened: sum over t1 of p(t1) p(t2 | t1)
    p(t3 | t1, t2). The joint, not the third token alone, so a wrong child distribution cannot average out."""
    with torch.no_grad():
        p1 = probabilities(model(ids).logits[0, -1], cfg)
        v = p1.shape[0]
        one = torch.cat([ids.repeat(v, 1), torch.arange(v)[:, None]], dim=1)
        p2 = probabilities(model(one).logits[:, -1], cfg)  # (t1, t2)
        two = torch.cat([one.repeat_interleave(v, 0), torch.arange(v).repeat(v)[:, None]], dim=1)
        p3 = probabilities(model(two).logits[:, -1], cfg).reshape(v, v, v)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3).flatten()


#: samples of each test below
N_SAMPLES = 4000


def _last_two_sampler(sm, ids, cfg):
    """``sample() -> 8 * second + third`` of one generation of three tokens, seeded alike for every test."""
    gen = torch.Generator().manual_seed(11)

    def sample() -> int:
        out = sample_three(sm, ids, cfg, gen)
        return int(8 * out[0, -2] + out[0, -1])

    return sample


def test_tree_sampling_matches_the_target_distribution(tree_sampling):
    model, sm, ids, cfg = tree_sampling
    sample, counts, descended = _last_two_sampler(sm, ids, cfg), torch.zeros(64), 0
    for _ in range(N_SAMPLES):
        counts[sample()] += 1
        descended += sm.last_stats.steps == 1  # the third token was sampled at a tree node below the root
    assert descended > 1300, "too few third tokens came from below the root to test the tree"
    assert chi2_pvalue(counts, _last_two_distribution(model, ids, cfg)) > 1e-3


@pytest.mark.parametrize("broken", ["always_descend", "parent_row", "chain_mask"])
def test_tree_sampling_negative_controls_fail(tree_sampling, monkeypatch, broken):
    """Acceptance that keeps the first child without sampling, or samples a child's token from its parent's
    row, or a tree mask that lets a node see its earlier siblings (a chain's mask), must fail the same test."""
    model, sm, ids, cfg = tree_sampling

    def always_descend(tree, logits, sampling, generator=None):
        first = tree.child(0, tree.tokens[1]) if len(tree) > 1 else None
        if first is None:
            return accept_tree(tree, logits, sampling, generator)
        return [first], int(torch.multinomial(probabilities(logits[first], sampling), 1, generator=generator))

    def parent_row(tree, logits, sampling, generator=None):
        y = int(torch.multinomial(probabilities(logits[0], sampling), 1, generator=generator))
        child = tree.child(0, y)
        if child is None:
            return [], y
        return [child], int(torch.multinomial(probabilities(logits[0], sampling), 1, generator=generator))

    if broken == "chain_mask":
        monkeypatch.setattr(
            DraftTree, "ancestors", lambda self: torch.ones(len(self), len(self), dtype=torch.bool).tril()
        )
    else:
        rules = {"always_descend": always_descend, "parent_row": parent_row}
        monkeypatch.setattr(generate_module, "accept_tree", rules[broken])
    probs = _last_two_distribution(model, ids, cfg)
    assert negative_control_pvalue(_last_two_sampler(sm, ids, cfg), N_SAMPLES, probs) < 1e-3
