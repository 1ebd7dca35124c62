"""Calibration's second stage: draft candidates and what the calibration text says of each, before any is timed.

- Early exits with a trained adapter (Kangaroo, Liu et al., 2024), distilled from the final distribution, and the
  per-layer agreement of plain exits (LayerSkip's observation: untrained early exits rarely agree).
- Skip sets (SWIFT, Xia et al., 2024): a few layer sets scored by agreement on the same text.
- Each candidate's expected tokens per verify step from its agreement runs on held-out text, its cost from
  measured program times: an estimate that ranks which draft programs are worth compiling and timing.
- Token Recycling's acceptance per depth and rank (Luo et al., 2024), for the draft trees' templates.
- DEL (Zarch et al., 2025): the exits where its rate is best, if that rate promises to beat plain decoding.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from torch import nn

from specpass.programs import del_costs, del_param_costs
from specpass.progress import progress_bar
from specpass.runtime.dynamic_exit import ExitChooser
from specpass.tune.adapter import ExitAdapter
from specpass.tune.plan import SpecPlan
from specpass.tune.text import Text


@dataclasses.dataclass
class Candidate:
    """A draft program candidate: an exit (with adapter) or a skip set, a head size, and its best draft length
    by the cost model (``estimate``: its speed relative to plain decoding)."""

    desc: dict  # exit_layer or skip_layers, vocab, active_layers
    max_draft: int
    tau: float
    estimate: float

    def key(self) -> tuple:
        return (self.desc.get("exit_layer"), tuple(self.desc.get("skip_layers", ())), self.desc["vocab"])


def exit_layers(n_layers: int, fractions) -> list[int]:
    """The candidate exit layers: ``fractions`` of the depth, at least one layer below the last."""
    return sorted({min(n_layers - 2, max(0, round(n_layers * f) - 1)) for f in fractions})


def final_norm_and_head(model: nn.Module, structure) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    path = structure.final_norm_path
    norm = model.get_submodule(path.removeprefix("model.")) if path else nn.Identity()
    return norm, head


def plain_exit_agreement(model, structure, text: Text) -> dict[int, float]:
    """Per layer, how often its plain early exit (final norm and head, no adapter) agrees with the model on the
    held-out generated positions: LayerSkip's baseline, and what DEL's choice reads."""
    norm, head = final_norm_and_head(model, structure)
    valid = text.generated & text.held_out
    with torch.no_grad():
        return {
            k: float(
                (nn.functional.linear(norm(h[valid]), head.weight).argmax(-1) == text.target[valid]).float().mean()
            )
            for k, h in text.hidden.items()
        }


def train_adapter(text: Text, k: int, norm32, head_rows, *, rank: int, seconds: float, progress: bool) -> ExitAdapter:
    """Distil the final distribution (over the ranked head rows) into an exit adapter after layer ``k``.

    Trains in float32 whatever the model's dtype (``norm32`` and ``head_rows`` float32 too): AdamW's small
    updates vanish in bf16. The draft program casts the adapter to the model's dtype (SpecPlan.draft_config).
    """
    torch.manual_seed(0)
    train = ~text.held_out
    h = text.hidden[k][train].float()
    adapter = ExitAdapter(h.shape[1], rank).to(h.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=2e-3, weight_decay=0.0)
    target = text.target_logits[train].float().log_softmax(-1)
    t0 = time.perf_counter()
    n = h.shape[0]
    with progress_bar(desc=f"specpass: exit adapter after layer {k}", unit="step", enabled=progress) as bar:
        step = 0
        while time.perf_counter() - t0 < seconds and step < 3000:
            idx = torch.randint(0, n, (min(256, n),))
            with torch.enable_grad():
                logits = nn.functional.linear(norm32(adapter(h[idx])), head_rows)
                loss = nn.functional.kl_div(logits.log_softmax(-1), target[idx], log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return adapter.eval().requires_grad_(False)


def adapter_agreement(text: Text, k: int, adapter: ExitAdapter, norm32, head_rows, sizes) -> list[tuple]:
    """(description, agreement (P,) bool) of the exit after layer ``k`` with ``adapter``, per head size."""
    with torch.no_grad():
        logits = nn.functional.linear(norm32(adapter(text.hidden[k].float())), head_rows)
    return [
        ({"exit_layer": k, "vocab": n, "active_layers": k + 1}, text.ranked[logits[:, :n].argmax(-1)] == text.target)
        for n in sizes
    ]


def skip_sets(n_layers: int, count: int) -> list[list[int]]:
    """SWIFT-style skip sets: a random half, 40% or 30% of the layers between the first and the last (none for
    a model with no layer between them)."""
    g = torch.Generator().manual_seed(0)
    body = list(range(1, n_layers - 1))
    sets = []
    for frac in (0.5, 0.4, 0.3)[: count if body else 0]:
        n = max(1, round(len(body) * frac))
        sets.append(sorted(torch.tensor(body)[torch.randperm(len(body), generator=g)[:n]].tolist()))
    return sets


def skip_agreement(model, structure, text: Text, skip: list[int], sizes) -> list[tuple]:
    """(description, agreement (P,) bool) of the model with the ``skip`` layers turned into identities."""
    layers = model.get_submodule(structure.layers_path.removeprefix("model."))

    def identity(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    hooks = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        with torch.no_grad():
            logits = torch.cat([model(seq).logits[0, :-1] for seq in text.input_ids])
    finally:
        for h in hooks:
            h.remove()
    n_layers = len(structure.layers)
    return [
        (
            {"skip_layers": skip, "vocab": n, "active_layers": n_layers - len(skip)},
            text.ranked[logits[:, text.ranked[:n]].argmax(-1)] == text.target,
        )
        for n in sizes
    ]


def runs(agree: torch.Tensor, valid: torch.Tensor, cap: int) -> torch.Tensor:
    """At each valid position, how many consecutive draft tokens from there would be accepted (<= cap)."""
    n = agree.shape[0]
    run = torch.zeros(n + 1, dtype=torch.long)
    ok = agree & valid
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if ok[i] else 0
    return run[:n][valid].clamp(max=cap)


def rank_candidates(agreements: list[tuple], text: Text, costs: dict, n_layers: int, max_draft: int) -> list:
    """Every candidate at its best draft length by the cost model, best first (one entry per exit or skip
    set and head size). ``costs``: timing.measure_costs's seconds per verify call and of the full head."""
    (vocab, head), valid = next(iter(costs["head"].items())), text.generated & text.held_out
    body = costs["verify"][1] - head
    best: dict[tuple, Candidate] = {}
    for desc, agree in agreements:
        n = desc["vocab"]
        draft_cost = body * desc["active_layers"] / n_layers + head * n / vocab  # a GEMV is linear in its rows
        for gamma in range(1, max_draft + 1):
            tau = 1 + float(runs(agree, valid, gamma).float().mean())
            estimate = tau / (gamma * draft_cost + costs["verify"][gamma + 1]) * costs["verify"][1]
            cand = Candidate(desc, gamma, tau, estimate)
            if cand.key() not in best or estimate > best[cand.key()].estimate:
                best[cand.key()] = cand
    return sorted(best.values(), key=lambda c: -c.estimate)


def median_context(text: Text) -> int:
    return int(statistics.median([s.shape[1] for s in text.input_ids]))


def recycled_acceptance(
    text: Text, k: int, sequences: int, depths: int = 6
) -> tuple[list[list[float]], dict[int, list[int]]]:
    """Token Recycling's acceptance per depth and rank, replayed on the calibration text: walking each greedy
    continuation in order, the table holds every earlier position's top-k, and at each position a tree rooted
    there would find the true token d + 1 ahead at some rank of the table's row for the token d ahead.
    As at run time, only generated positions (not the prompt) fill the table, and it carries over prompts.
    Replays the first ``sequences`` sequences; returns the acceptance and the table at the end."""
    top = text.ranked[text.target_logits.topk(k, dim=-1).indices].tolist()
    table: dict[int, list[int]] = {}
    hits, tries = [[0] * k for _ in range(depths)], [0] * depths
    offset = 0
    for seq in text.input_ids[:sequences]:
        ids = seq[0].tolist()
        for i in range(len(ids) - 1):
            if text.generated[offset + i]:
                for d in range(min(depths, len(ids) - 1 - i)):
                    tries[d] += 1
                    row = table.get(ids[i + d])
                    if row is not None and ids[i + d + 1] in row:
                        hits[d][row.index(ids[i + d + 1])] += 1
                table[ids[i]] = top[offset + i]
        offset += len(ids) - 1
    return [[h / t if t else 0.0 for h in row] for row, t in zip(hits, tries, strict=True)], table


def del_candidate(
    captured, agreement: dict[int, float], *, max_draft: int, exits: int, min_gain: float, lookup: dict
) -> tuple[SpecPlan | None, dict]:
    """A DEL plan over the ``exits`` layers whose held-out plain-exit ``agreement`` promises the most tokens per
    unit of compute, if that promise beats plain decoding by ``min_gain`` (else None), and the estimate."""
    layers = sorted(agreement)
    drafts, _ = del_param_costs(captured, layers)
    chooser = ExitChooser(layers, drafts, max_draft)
    chooser.alpha = dict(agreement)
    gains = {k: max(chooser.rate(k, g) for g in range(1, max_draft + 1)) for k in layers}
    chosen = sorted(sorted(layers, key=gains.get, reverse=True)[:exits])
    plan = SpecPlan(speculate=True, del_exits=chosen, max_draft=max_draft, threshold=0.3, **lookup)
    plan.del_costs = del_costs(captured, plan)
    # The best round DEL expects, per plain pass: its verify pass reads the extra heads every round.
    chooser = ExitChooser(chosen, plan.del_costs, max_draft)
    chooser.alpha = {k: agreement[k] for k in chosen}
    _, verify = del_param_costs(captured, chosen)
    estimate = max(chooser.rate(k, g) for k in chosen for g in range(max_draft + 1)) / verify
    found = {"exits": chosen, "tokens_per_plain_pass": round(estimate, 3)}
    return (plan if estimate > 1 + min_gain else None), found
