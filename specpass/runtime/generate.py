"""The decode loops: plain (one token per step) and speculative (draft -> verify -> accept -> roll back),
with HF-style stopping and streaming.

Reads in one sitting on purpose (gpt-fast): the programs are plain callables with the specpass signature
``logits = program(input_ids, position_ids, cache_position, *masks, *kv)``; the cache decides slots and masks.
That is also why this module is over 500 lines: the plain loop, the speculative round and their stopping rules
are one story, and splitting them would make a reader follow a round across files.

Speculation writes no scratch copies: the draft writes its K/V at the slots after the committed prefix, and
verification rewrites the same slots with the target's K/V for the same tokens. Acceptance commits the
verified prefix; whatever lies beyond it is stale, masked out and overwritten by the next step.

Recurrent state (linear-attention and state-space layers) has no slots to leave stale: a round checkpoints it,
the verify pass starts from the checkpoint (the draft program has moved it), and when verification rejects a
suffix the state goes back to the checkpoint and the accepted tokens are run again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from specpass.errors import SpecPassError
from specpass.runtime.dynamic_exit import VERIFY_EXITS, ExitChooser, draft_program_name
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.lookup import NgramIndex
from specpass.runtime.recycle import AdjacencyTable
from specpass.runtime.sampling import SamplingConfig, greedy, probabilities, select
from specpass.runtime.tree import DraftTree, accept_tree
from specpass.runtime.verify import greedy_accept, sample_accept

Program = Callable[..., torch.Tensor]


@dataclasses.dataclass
class GenerationStats:
    """What one generate() call did; ``tokens_per_s`` counts new tokens over the whole call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0  # speculative decoding: time in the draft program
    verify_s: float = 0.0  # ... and in the verify program
    drafted: list[int] = dataclasses.field(default_factory=list)  # drafted[i]: steps that drafted position i
    accepted: list[int] = dataclasses.field(default_factory=list)  # accepted[i]: steps that accepted it
    tree_nodes: int = 0  # tree mode: nodes verified, roots included
    exit_rounds: dict[int, int] = dataclasses.field(default_factory=dict)  # DEL: drafting rounds per exit layer
    # tree mode: verified tokens per depth, and those the recycled-token table held, by rank
    rank_hits: list[list[int]] = dataclasses.field(default_factory=list)
    rank_tries: list[int] = dataclasses.field(default_factory=list)

    @property
    def tau(self) -> float:
        """Tokens per verify step: 1 + accepted draft tokens per step (1.0 for plain decoding)."""
        return 1 + sum(self.accepted) / self.steps if self.steps else 1.0

    @property
    def acceptance(self) -> list[float]:
        """Per draft position: the fraction of drafted tokens that verification accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted, strict=True)]

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict:
        """The fields and the derived figures, for JSON output."""
        derived = {"tau": self.tau, "acceptance": self.acceptance, "tokens_per_s": self.tokens_per_s}
        return {**dataclasses.asdict(self), **derived}


class StopChecker:
    """max_new_tokens, eos ids and stop strings, with HF's semantics (the stopping token is kept)."""

    def __init__(self, max_new_tokens: int, eos: Sequence[int], stop_strings: Sequence[str], tokenizer):
        if stop_strings and tokenizer is None:
            raise SpecPassError("stop_strings needs a tokenizer: pass tokenizer= to generate()")
        self.max_new_tokens = max_new_tokens
        self.eos = set(int(e) for e in eos)
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer

    def done(self, new_ids: list[int]) -> bool:
        if len(new_ids) >= self.max_new_tokens or (new_ids and new_ids[-1] in self.eos):
            return True
        if self.stop_strings and new_ids:
            # A stop string counts once it ends inside the last token's text (HF's StopStringCriteria).
            text = self.tokenizer.decode(new_ids)
            before = len(self.tokenizer.decode(new_ids[:-1]))
            for s in self.stop_strings:
                at = text.rfind(s)
                if at >= 0 and at + len(s) > before:
                    return True
        return False


#: attention width granularity: programs attend to the first W cache slots, W a multiple of this
WINDOW_BUCKET = 64


def attention_width(used: int, capacity: int) -> int:
    """The mask width: programs attend to the first W slots (see capture.py), so W covers every used slot."""
    return min(capacity, -(-used // WINDOW_BUCKET) * WINDOW_BUCKET)


def _run(program: Program, cache: KVCache, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Run q = ids.shape[1] chain tokens at the slots after ``offset`` uncommitted ones; return their logits."""
    q = ids.shape[1]
    slots = cache.reserve(q, offset)
    width = attention_width(cache.length + offset + q, cache.capacity)
    # Contiguous masks of exactly this width: a sliced view's strides would fail the compiled graph's guards.
    masks = cache.chain_masks(q, width, offset)
    return program(ids, slots[None, :], slots, *masks, *cache.tensors)


def _run_tree(program: Program, cache: KVCache, tree: DraftTree, first: int = 0) -> torch.Tensor:
    """Run the nodes first.. of ``tree`` at the slots after the committed prefix (node i at slot length + i);
    the nodes before ``first`` must already hold their K/V there."""
    n = len(tree)
    slots = cache.reserve(n)[first:]
    width = attention_width(cache.length + n, cache.capacity)
    depth = torch.tensor(tree.depth, device=cache.device)
    masks = cache.tree_masks(tree.ancestors(), depth, width, first)
    ids = torch.tensor([tree.tokens[first:]], device=cache.device)
    return program(ids, (cache.length + depth[first:])[None], slots, *masks, *cache.tensors)


def _step(program: Program, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Run q chain tokens at the next slots and commit them."""
    logits = _run(program, cache, ids)
    cache.commit(ids.shape[1])
    return logits


def _prefill(programs, cache, input_ids, sampling, generator, streamer, stats) -> torch.Tensor:
    """Start a generation: empty the cache, echo the prompt to the streamer, run the prompt; the first token."""
    cache.reset()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    t0 = time.perf_counter()
    logits = _step(programs["prefill"], cache, input_ids)
    token = select(logits[:, -1], sampling, generator)
    stats.prefill_s = time.perf_counter() - t0
    return token


def _finish(input_ids: torch.Tensor, new: list[int], stats: GenerationStats, streamer):
    """End a generation: close the stream; prompt + new ids, and the stats."""
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(new)
    out = torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, out], dim=1), stats


def _emit(tokens: list[int], new: list[int], stop: StopChecker, streamer) -> bool:
    """Append verified tokens one by one (a stop inside an accepted run ends there, as in HF); True when done."""
    for t in tokens:
        new.append(t)
        if streamer is not None:
            streamer.put(torch.tensor([t]))
        if stop.done(new):
            return True
    return False


def generate(
    programs: dict[str, Program],
    cache: KVCache,
    input_ids: torch.Tensor,
    *,
    sampling: SamplingConfig,
    stop: StopChecker,
    streamer=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Autoregressive generation with the ``prefill`` and ``decode`` programs; returns prompt + new ids."""
    stats = GenerationStats(prompt_tokens=input_ids.shape[1])
    new: list[int] = []
    with torch.no_grad():  # not inference_mode: its tensors would not match the compiled guards
        token = _prefill(programs, cache, input_ids, sampling, generator, streamer, stats)
        t0 = time.perf_counter()
        while True:
            new.append(int(token))
            if streamer is not None:
                streamer.put(token.cpu())
            if stop.done(new):
                break
            logits = _step(programs["decode"], cache, token[:, None])
            token = select(logits[:, -1], sampling, generator)
            stats.steps += 1
        stats.decode_s = time.perf_counter() - t0
    return _finish(input_ids, new, stats, streamer)


@dataclasses.dataclass
class DraftPolicy:
    """How long each draft runs: Draft&Verify's adaptive draft exiting (Zhang et al., 2023).

    Drafting stops after ``max_draft`` tokens or once the draft's top probability falls below a threshold.
    The threshold follows the observed acceptance: a smoothed acceptance rate below ``target_acceptance``
    raises it by ``step`` (draft less), above lowers it (draft more). A context n-gram match, when lookup is
    on, drafts instead of the draft program: it costs nothing to propose.

    In tree mode (``tree_budget`` > 0) the draft program grows EAGLE-2 trees (``_draft_tree``): ``max_draft``
    is their depth and the threshold bounds a path's confidence (the product of its draft probabilities).
    """

    max_draft: int = 4
    threshold: float = 0.5
    adaptive: bool = True
    target_acceptance: float = 0.8
    step: float = 0.05
    smoothing: float = 0.5
    #: up to this many tokens proposed by n-gram lookup in the context (runtime/lookup.py) before the draft
    #: program is asked; 0 disables lookup
    lookup: int = 0
    lookup_max_ngram: int = 3
    lookup_min_ngram: int = 1
    #: draft trees (tree_generate) when > 0: nodes per verify pass, root included; 0 drafts chains
    tree_budget: int = 0
    #: tree mode: the continuations lookup adds, the most recent first
    lookup_branches: int = 1
    #: tree mode: the template (parent, rank) walked in the recycled-token table (runtime/recycle.py)
    tree_template: tuple[tuple[int, int], ...] = ()
    #: tree mode: EAGLE-2's k, the draft program's children per expanded node and nodes expanded per level
    #: (1: a greedy chain)
    draft_topk: int = 1
    #: DEL (runtime/dynamic_exit.py): the candidate exit layers, each with its draft program, and a draft
    #: token's cost at each relative to a verify pass; the exit and length are then chosen every round
    exits: tuple[int, ...] = ()
    exit_costs: tuple[float, ...] = ()


def _lookup_index(policy: DraftPolicy, input_ids: torch.Tensor) -> NgramIndex | None:
    """The context's n-gram index when the policy drafts by lookup."""
    if not policy.lookup:
        return None
    return NgramIndex(input_ids[0].tolist(), max_n=policy.lookup_max_ngram, min_n=policy.lookup_min_ngram)


def speculative_generate(
    programs: dict[str, Program],
    cache: KVCache,
    input_ids: torch.Tensor,
    *,
    policy: DraftPolicy,
    sampling: SamplingConfig,
    stop: StopChecker,
    streamer=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Lossless speculative generation: ``prefill``, then drafts (context lookup, else the ``draft`` program
    when there is one, or under DEL the exit chosen this round) verified by the ``decode`` program (under DEL,
    ``verify_exits``: the same logits and each candidate exit's tokens)."""
    chooser = ExitChooser(policy.exits, policy.exit_costs, policy.max_draft) if policy.exits else None
    drafts = "draft" in programs or chooser is not None
    longest = max(policy.lookup, policy.max_draft if drafts else 0)
    stats = GenerationStats(prompt_tokens=input_ids.shape[1], drafted=[0] * longest, accepted=[0] * longest)
    threshold, rate = policy.threshold, policy.target_acceptance
    index = _lookup_index(policy, input_ids)
    new: list[int] = []
    with torch.no_grad():
        token = _prefill(programs, cache, input_ids, sampling, generator, streamer, stats)
        t_start = time.perf_counter()
        pending = [int(token)]  # verified tokens not yet emitted; the last one is not in the cache yet
        while not _emit(pending, new, stop, streamer):
            last = new[-1]
            if index is not None:
                index.extend(pending)

            # Draft: a context match if there is one, else up to max_draft draft-program tokens (DEL: the
            # chosen exit's program and length), fewer when the draft is unsure; never past the request's end.
            t0 = time.perf_counter()
            room = stop.max_new_tokens - len(new) - 1
            draft_ids, draft_probs = [], []
            if index is not None:
                draft_ids = index.propose(min(policy.lookup, room))
            draft, budget = programs.get("draft"), policy.max_draft
            if chooser is not None and not draft_ids:
                exit_layer, budget = chooser.choose()
                draft = programs[draft_program_name(exit_layer)]
            budget = 0 if draft_ids or draft is None else min(budget, room)
            if chooser is not None and budget:  # after the clamp: at the request's end an exit may draft nothing
                stats.exit_rounds[exit_layer] = stats.exit_rounds.get(exit_layer, 0) + 1
            if cache.has_state and (draft_ids or budget):  # a round that drafts nothing cannot be rolled back
                cache.checkpoint()
            if budget:
                draft_ids, draft_probs = _draft_chain(draft, cache, last, budget, threshold, sampling, generator)
                if cache.has_state:
                    cache.restore()
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0

            # Verify the last token and every draft token in one target pass; commit what it accepts.
            ids = torch.tensor([[last, *draft_ids]], device=input_ids.device)
            if chooser is None:
                target = _run(programs["decode"], cache, ids)[0]
            else:  # the same logits, and each candidate exit's token at every row
                target, *shadows = _run(programs[VERIFY_EXITS], cache, ids)
                target = target[0]
            if sampling.do_sample:
                proposed = ids[0, 1:]
                p = probabilities(target, sampling)
                if draft_probs:
                    q = torch.stack(draft_probs)
                else:  # a lookup draft is deterministic: q is one-hot at each proposed token
                    q = torch.nn.functional.one_hot(proposed, p.shape[-1]).to(p.dtype)
                n, bonus = sample_accept(proposed, q, p, generator)
            else:
                n, bonus = greedy_accept(draft_ids, target)
            _commit_verified(programs["decode"], cache, ids, 1 + n)
            stats.verify_s += time.perf_counter() - t1
            stats.steps += 1
            for i in range(len(draft_ids)):
                stats.drafted[i] += 1
                stats.accepted[i] += i < n
            pending = [*draft_ids[:n], bonus]
            if chooser is not None:  # rows 0..n are verified: pending[i] is the target's token after row i
                chooser.update({k: s[0, : n + 1].tolist() for k, s in zip(policy.exits, shadows, strict=True)}, pending)

            if policy.adaptive and draft_probs:
                rate = policy.smoothing * rate + (1 - policy.smoothing) * n / len(draft_ids)
                threshold += policy.step if rate < policy.target_acceptance else -policy.step
                threshold = min(max(threshold, 0.0), 1.0)
        stats.decode_s = time.perf_counter() - t_start
    return _finish(input_ids, new, stats, streamer)


def _commit_verified(program: Program, cache: KVCache, ids: torch.Tensor, n: int) -> None:
    """Commit the first ``n`` of the verified ``ids``. K/V past them is stale and masked; recurrent state has
    taken in every verified token, so unless all are kept it returns to the round's checkpoint and reads the
    ``n`` accepted ones again."""
    if cache.has_state and n < ids.shape[1]:
        cache.restore()
        _run(program, cache, ids[:, :n])
    cache.commit(n)


def _draft_chain(
    program: Program, cache: KVCache, last: int, budget: int, threshold: float, sampling, generator
) -> tuple[list[int], list[torch.Tensor]]:
    """Up to ``budget`` draft tokens after ``last`` from ``program``, ending with the first whose probability is
    under ``threshold`` (Draft&Verify's adaptive draft exiting); (their ids, the draft's distributions).

    On a GPU the draft tokens stay on the device and are read back once, after the loop: stopping at the
    threshold would need a host sync per token, which stalls the queue of kernels, so the whole budget is
    drafted and cut afterwards at the same token (greedy drafts depend only on the tokens before them). On a
    CPU, or when sampling (a draft sampled past the cut would consume the generator), each token is checked
    as it comes and drafting stops there.
    """
    deferred = defer_draft_sync(cache.device) and not sampling.do_sample
    current = torch.tensor([[last]], device=cache.device)
    tokens, probs_list, confidence = [], [], []
    for i in range(budget):
        row = _run(program, cache, current, offset=i)[0, -1]
        probs = probabilities(row, sampling) if sampling.do_sample else row.softmax(-1)
        d = torch.multinomial(probs, 1, generator=generator) if sampling.do_sample else greedy(probs)[None]
        tokens.append(d)
        probs_list.append(probs)
        if deferred:
            confidence.append(probs.max())
        elif float(probs.max()) < threshold:
            break
        current = d[None]
    ids = torch.cat(tokens).tolist()
    if deferred:
        unsure = (torch.stack(confidence) < threshold).tolist()
        n = unsure.index(True) + 1 if True in unsure else len(ids)
        ids, probs_list = ids[:n], probs_list[:n]
    return ids, probs_list


def defer_draft_sync(device: torch.device) -> bool:
    """Whether a draft chain on ``device`` is read back once after drafting rather than token by token."""
    return device.type == "cuda"


def tree_bucket(nodes: int, budget: int) -> int:
    """The node count a tree of ``nodes`` is padded to: the next power of two, at most ``budget``."""
    return min(budget, 1 << (nodes - 1).bit_length())


#: the depths of tree acceptance per rank that GenerationStats counts
RANK_DEPTHS = 8


def tree_generate(
    programs: dict[str, Program],
    cache: KVCache,
    input_ids: torch.Tensor,
    *,
    policy: DraftPolicy,
    sampling: SamplingConfig,
    stop: StopChecker,
    table: AdjacencyTable,
    streamer=None,
    generator: torch.Generator | None = None,
    pad_vocab: int = 0,
) -> tuple[torch.Tensor, GenerationStats]:
    """Lossless speculative generation with draft trees (runtime/tree.py) verified by ``decode`` in one pass.

    ``pad_vocab`` > 0: fill every tree up to a power of two of nodes (``tree_bucket``) with token ids below it,
    so that CUDA graphs need one graph per bucket rather than one per node count; fillers are candidates like
    any other.

    Each step's tree fuses, in this order of priority, the context lookup's continuations, the draft
    program's greedy chain (when there is one and lookup found nothing) and the recycled-token template
    walked in ``table``, up to ``policy.tree_budget`` nodes. The accepted path's K/V is compacted into the
    slots after the committed prefix; the rest of the tree is left stale beyond it.
    """
    stats = GenerationStats(prompt_tokens=input_ids.shape[1])
    stats.rank_hits = [[0] * table.k for _ in range(RANK_DEPTHS)]
    stats.rank_tries = [0] * RANK_DEPTHS
    index = _lookup_index(policy, input_ids)
    new: list[int] = []
    with torch.no_grad():
        token = _prefill(programs, cache, input_ids, sampling, generator, streamer, stats)
        t_start = time.perf_counter()
        pending = [int(token)]
        while not _emit(pending, new, stop, streamer):
            if index is not None:
                index.extend(pending)

            # Draft: never deeper than the request has tokens left, never wider than the cache has slots.
            t0 = time.perf_counter()
            room = stop.max_new_tokens - len(new) - 1
            tree = DraftTree(new[-1], min(policy.tree_budget, cache.capacity - cache.length), room)
            found = index.propose_many(policy.lookup, policy.lookup_branches) if index is not None else []
            for chain in found:
                tree.add_path(chain)
            if not found and "draft" in programs:
                _draft_tree(programs["draft"], cache, tree, min(policy.max_draft, room), policy)
            table.grow(tree, policy.tree_template)
            if pad_vocab:
                tree.pad(tree_bucket(len(tree), tree.budget), pad_vocab)
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0

            # Verify every node in one pass, walk the tree, keep the accepted path's K/V.
            logits = _run_tree(programs["decode"], cache, tree)[0]
            path, bonus = accept_tree(tree, logits, sampling, generator)
            cache.compact([cache.length + node for node in (0, *path)])
            pending = [*(tree.tokens[node] for node in path), bonus]
            table.record([new[-1], *pending], stats.rank_hits, stats.rank_tries)
            table.update(tree.tokens, logits)
            stats.verify_s += time.perf_counter() - t1

            stats.steps += 1
            stats.tree_nodes += len(tree)
            for d in range(tree.max_depth):
                if d == len(stats.drafted):
                    stats.drafted.append(0)
                    stats.accepted.append(0)
                stats.drafted[d] += 1
                stats.accepted[d] += d < len(path)
        stats.decode_s = time.perf_counter() - t_start
    return _finish(input_ids, new, stats, streamer)


def _draft_tree(program: Program, cache: KVCache, tree: DraftTree, levels: int, policy: DraftPolicy) -> None:
    """Grow ``tree`` (its root alone) with EAGLE-2's dynamic draft tree (Li et al., 2024) from the draft program.

    Each level runs the draft once over the ``k = policy.draft_topk`` most confident nodes of the level before
    (the root first) and gives each its top-k tokens as children; a node's confidence is the product of the
    draft's probabilities along its path, EAGLE-2's estimate of its acceptance. Expansion stops after
    ``levels`` levels or once no node of the new level is at least ``policy.threshold`` confident. Then the
    most confident candidates fill the tree's budget (reranking): a child is never more confident than its
    parent, so they form a tree. k = 1 is a greedy chain.

    The draft's K/V goes to scratch slots after the committed prefix, which the verify pass overwrites or
    leaves beyond the accepted path. Children are the draft's argmax top-k, never samples: a tree must not
    depend on the target's randomness (runtime/tree.py), and the draft's never does.
    """
    k = policy.draft_topk
    # The nodes the draft has run on, node i at slot length + i; a tree so its masks say what each one sees.
    scratch = DraftTree(tree.tokens[0], budget=cache.capacity - cache.length, max_depth=levels)
    parents, tokens, scores = [], [], []  # the candidates; parent -1 is the root
    node_of = {-1: 0}  # expanded candidate -> its scratch node
    frontier = [-1]  # the candidates this level expands, the newest nodes of scratch
    for level in range(levels):
        probs = _run_tree(program, cache, scratch, first=len(scratch) - len(frontier))[0].softmax(-1)
        top = probs.topk(min(k, probs.shape[-1]), dim=-1)
        born = len(scores)
        for cand, p_row, t_row in zip(frontier, top.values.tolist(), top.indices.tolist(), strict=True):
            for p, t in zip(p_row, t_row, strict=True):
                parents.append(cand)
                tokens.append(t)
                scores.append((1.0 if cand < 0 else scores[cand]) * p)
        best = sorted(range(born, len(scores)), key=lambda c: -scores[c])[:k]
        if level + 1 == levels or scores[best[0]] < policy.threshold:
            break
        frontier = []
        for c in best:
            node = scratch.add(node_of[parents[c]], tokens[c])
            if node is not None:
                node_of[c] = node
                frontier.append(c)
        if not frontier:
            break

    # Rerank: the most confident candidates, ties to the older (a parent before its children), placed in
    # creation order so that every parent is in the tree before its children.
    room = tree.budget - len(tree)
    ranked = sorted((c for c in range(len(scores)) if scores[c] > 0), key=lambda c: (-scores[c], c))
    chosen = sorted(ranked[:room])
    placed = {-1: 0}
    for c in chosen:
        if parents[c] in placed:
            node = tree.add(placed[parents[c]], tokens[c])
            if node is not None:
                placed[c] = node
