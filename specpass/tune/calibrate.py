"""Calibration: choose the drafts, their head size and their draft length by measured speed.

Two searches, both lossless and both keeping plain compiled decoding unless a draft measured faster:

- **quick** (``optimize()`` with no cached plan; seconds): context lookup, which needs no program besides
  plain decoding's, timed generating against plain decoding on a few prompts.
- **full** (``specpass tune``, ``optimize(..., calibrate="full")``, ``specpass.calibrate``; minutes, within a
  time budget), in four stages that this module runs top to bottom:

  1. *text* (tune/text.py): the model's own greedy continuations of calibration prompts, teacher-forced.
  2. *candidates* (tune/candidates.py): exit adapters trained, skip sets scored, every draft program ranked by
     a cost model of measured program times and its acceptance on held-out text.
  3. *timing* (tune/timing.py): context lookup, draft trees (Sequoia templates over recycled tokens), the best
     draft programs (compiled only now) and DEL, each timed generating against plain decoding.
  4. *choose*: the fastest, if it beats plain decoding by ``min_gain``.

  Every result is kept on disk as it is made (timing.Ledger): a search stopped by its budget, or interrupted,
  resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from specpass.errors import SpecPassError
from specpass.lower import cancel, resolve
from specpass.programs import build_draft_programs, check_tree_verify, compile_plain, start_draft_program
from specpass.progress import progress_bar
from specpass.tune import candidates as cand
from specpass.tune import timing
from specpass.tune.plan import SEARCHES, SpecPlan, model_hash
from specpass.tune.text import DEFAULT_PROMPTS, generate_text, prompt_ids, teacher_force
from specpass.tune.timing import Ledger, measure_costs, tokens_per_s
from specpass.tune.tree_shape import best_tree

log = logging.getLogger("specpass.tune")


@dataclasses.dataclass
class CalibrationSettings:
    new_tokens: int = 48  # greedy continuation length per calibration prompt
    vocab_sizes: tuple[int, ...] = (2048, 4096, 8192, 16384)  # pruned-head sizes to consider
    exit_fractions: tuple[float, ...] = (0.2, 0.4)  # candidate exit layers, as fractions of depth
    adapter_rank: int = 64
    train_seconds: float = 30.0  # per exit adapter, at most a tenth of a budget
    max_draft: int = 4
    skip_candidates: int = 4  # SWIFT-style skip sets scored
    timed_prompts: int = 6  # prompts generated to time each candidate (fewer: a few-percent noise decides)
    timed_tokens: int = 64
    finalists: int = 2  # candidates compiled and timed against plain decoding
    lookup_tokens: tuple[int, ...] = (1, 2, 3)  # context-lookup draft lengths timed (0 in a plan: no lookup)
    lookup_min_ngrams: tuple[int, ...] = (1, 2)
    tree_budgets: tuple[int, ...] = (2, 3, 4, 6, 8, 16)  # draft-tree sizes (nodes per verify, root included)
    recycled_k: int = 4  # recycled-token candidates per token considered for tree templates
    min_gain: float = 0.05  # a draft must beat plain decoding by this much: timing noise is a few percent
    del_exits: int = 3  # DEL's candidate exits, where the held-out agreement of plain exits says one may pay
    quick_prompts: int = 3  # the quick search: prompts generated per timing
    quick_tokens: int = 32  # the quick search: new tokens per prompt
    quick_lookups: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (2, 2))  # (lookup, min n-gram)


def calibrate_compiled(
    sm,
    prompts=None,
    *,
    tokenizer=None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
    search: str = "full",
    budget_s: float | None = None,
    resume: bool = False,
) -> SpecPlan:
    """Calibrate with an already-compiled plain SpecModel (``optimize(model, speculate=False)``).

    ``search``: "quick" or "full" (the module docstring). ``budget_s``: the full search times no candidate
    that would end past this many seconds (None: no limit). ``resume``: keep the full search's measurements on
    disk and start from those of an earlier, unfinished search of this model on this machine.
    """
    if search not in SEARCHES:
        raise SpecPassError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    settings = settings or CalibrationSettings()
    if len(sm.captured.structure.layers) < 2 and search == "full":
        return SpecPlan(speculate=False, reason="1 layer: no smaller draft inside the model", search="full")
    ids = prompt_ids(sm.model, prompts, tokenizer)
    if search == "quick":
        return quick_search(sm, ids, settings, progress)
    ledger = Ledger(
        timing.ledger_path(model_hash(sm.model, exact_lowbit=sm.exact_lowbit)) if resume else None, budget_s
    )
    # What was measured for other settings or prompts is not this search's.
    fingerprint = hashlib.sha256(json.dumps([repr(settings), [t.tolist() for t in ids]]).encode()).hexdigest()
    if ledger.get("fingerprint") != fingerprint:
        ledger.discard()
        ledger.put("fingerprint", fingerprint)
    plan = full_search(sm, ids, settings, progress, ledger)
    if plan.measurements["search"]["complete"]:
        ledger.discard()  # the next search starts anew
    return plan


# --------------------------------------------------------------------------------------------------------
# The quick search
# --------------------------------------------------------------------------------------------------------
def quick_search(sm, ids: list[torch.Tensor], settings: CalibrationSettings, progress: bool) -> SpecPlan:
    """Context lookup against plain decoding, timed on a few prompts: the plan of a first run."""
    t0 = time.perf_counter()
    step = max(1, len(ids) // settings.quick_prompts)
    timed = ids[::step][: settings.quick_prompts]
    n = settings.quick_tokens
    steps = progress_bar(total=len(settings.quick_lookups) + 2, desc="specpass: quick plan", enabled=progress)
    with steps:
        # Plain decoding timed before and after the candidates, its faster run kept: a candidate must beat the
        # machine at its best, not at a slow moment.
        plain = tokens_per_s(sm, None, timed, n)
        steps.update()
        timed_lookups, best, best_tps = [], None, 0.0
        for lookup, min_ngram in settings.quick_lookups:
            plan = SpecPlan(speculate=True, max_draft=0, lookup=lookup, lookup_min_ngram=min_ngram, search="quick")
            tps = tokens_per_s(sm, plan, timed, n)
            timed_lookups.append(
                {"lookup": lookup, "lookup_min_ngram": min_ngram, "plan": plan.describe(), "tokens_per_s": tps}
            )
            if tps > best_tps:
                best, best_tps = plan, tps
            steps.update()
        plain = max(plain, tokens_per_s(sm, None, timed, n))
        steps.update()
    measurements = {
        "search": {"kind": "quick", "complete": True, "prompts": len(timed), "new_tokens": n},
        "plain_tokens_per_s": plain,
        "timed": timed_lookups,
        "calibration_s": time.perf_counter() - t0,
    }
    if best is not None and best_tps > plain * (1 + settings.min_gain):
        plan = best
        plan.reason = f"{best_tps:.1f} tok/s vs {plain:.1f} plain ({best_tps / plain:.2f}x), quick search"
    else:
        plan = SpecPlan(speculate=False, search="quick")
        plan.reason = (
            f"no context lookup beat plain compiled decoding by {settings.min_gain:.0%}"
            f" (best {best_tps:.1f} vs {plain:.1f} tok/s)"
        )
    plan.measurements = measurements
    log.info("quick search chose: %s; %s", plan.describe(), plan.reason)
    return plan


# --------------------------------------------------------------------------------------------------------
# The full search
# --------------------------------------------------------------------------------------------------------
def full_search(sm, ids: list[torch.Tensor], settings: CalibrationSettings, progress: bool, ledger: Ledger):
    """The four stages of the module docstring; the plan, with every measurement it was chosen by."""
    model, structure = sm.model, sm.captured.structure
    n_layers = len(structure.layers)
    vocab = model.get_output_embeddings().weight.shape[0]
    if ledger.resumed:
        log.info("resuming the search of this model: %d results kept from the last run", len(ledger.resumed) - 1)

    # 1. text
    if "text" not in ledger:
        ledger.put("text", generate_text(sm, ids, settings.new_tokens, progress))
    text = teacher_force(model, n_layers, ledger.get("text"), settings.vocab_sizes)
    valid = text.generated & text.held_out
    measurements: dict = {"positions": int(text.target.shape[0]), "held_out_positions": int(valid.sum())}

    # 2. candidates
    agreement = cand.plain_exit_agreement(model, structure, text)
    measurements["agreement_no_adapter"] = agreement
    sizes = sorted({min(n, vocab) for n in settings.vocab_sizes})
    # The adapters train and are scored in float32 (candidates.train_adapter), on float32 copies of norm and head.
    norm, head = cand.final_norm_and_head(model, structure)
    norm32 = copy.deepcopy(norm).float()
    head_rows = head.weight[text.ranked[: text.target_logits.shape[1]]].float()
    train_s = settings.train_seconds if ledger.budget_s is None else min(settings.train_seconds, ledger.budget_s / 10)
    agreements, adapters, measurements["adapter_train_s"] = [], {}, {}
    for k in cand.exit_layers(n_layers, settings.exit_fractions):
        if f"adapter {k}" not in ledger:
            t0 = time.perf_counter()
            scratch = SpecPlan(speculate=False)
            scratch.set_adapter(
                cand.train_adapter(
                    text, k, norm32, head_rows, rank=settings.adapter_rank, seconds=train_s, progress=progress
                )
            )
            ledger.put(f"adapter {k}", {"adapter": scratch.adapter, "seconds": time.perf_counter() - t0})
        stored = ledger.get(f"adapter {k}")
        adapters[k] = SpecPlan(speculate=False, adapter=stored["adapter"]).exit_adapter(head_rows.device)
        measurements["adapter_train_s"][k] = stored["seconds"]
        agreements += cand.adapter_agreement(text, k, adapters[k], norm32, head_rows, sizes)
    for skip in cand.skip_sets(n_layers, settings.skip_candidates):
        agreements += cand.skip_agreement(model, structure, text, skip, sizes)
    if "costs" not in ledger:
        costs = measure_costs(sm, cand.median_context(text), settings.max_draft + 1)
        ledger.put("costs", {part: list(times.items()) for part, times in costs.items()})
    costs = {part: dict(pairs) for part, pairs in ledger.get("costs").items()}
    measurements["verify_ms"] = {q: 1e3 * t for q, t in costs["verify"].items()}
    ranked = cand.rank_candidates(agreements, text, costs, n_layers, settings.max_draft)
    measurements["best_estimates"] = [
        {"speedup_estimate": round(c.estimate, 3), "tau": round(c.tau, 3), "max_draft": c.max_draft, **c.desc}
        for c in ranked[:6]
    ]

    # 3. timing: cheapest first (lookup needs no program; trees only the verify program), so that a budget that
    # runs out leaves the candidates that cost a compile untimed, not the others
    timer = _Timer(sm, ledger, text.prompts()[-settings.timed_prompts :], settings, measurements, progress)
    with timer:
        lookup, lookup_tps = {"lookup": 0, "lookup_min_ngram": 1}, timer.plain
        for n, min_n in [(n, m) for n in settings.lookup_tokens for m in settings.lookup_min_ngrams]:
            fields = {"lookup": n, "lookup_min_ngram": min_n}
            tps = timer.time(SpecPlan(speculate=True, max_draft=0, **fields), fields)
            if tps > lookup_tps:
                lookup, lookup_tps = fields, tps
        front = _time_trees(sm, timer, text, settings, lookup, lookup_tps)
        finalists = []
        for c in ranked[: settings.finalists]:  # one entry per exit or skip set and head size
            # The draft program runs where lookup finds no match (with the best lookup or tree, if any beat plain).
            plan = SpecPlan(
                speculate=True,
                exit_layer=c.desc.get("exit_layer"),
                skip_layers=list(c.desc.get("skip_layers", [])),
                vocab_ids=None if c.desc["vocab"] >= vocab else sorted(text.ranked[: c.desc["vocab"]].tolist()),
                max_draft=c.max_draft,
                **front,
            )
            if plan.exit_layer is not None:
                plan.set_adapter(adapters[plan.exit_layer])
            if plan.tree_draft:  # a greedy chain inside the tree, or EAGLE-2's dynamic tree (top-2 per level)
                variants = [{"draft_topk": k, "threshold": 0.3} for k in (1, 2)]
            else:  # fixed-length chains, or Draft&Verify's adaptive exit
                variants = [{"adaptive": a, "threshold": 0.3 if a else 0.0} for a in (False, True)]
            finalists.append(([dataclasses.replace(plan, **v) for v in variants], {**c.desc, "max_draft": c.max_draft}))
        timer.time_programs(finalists)
        # DEL: plain early exits, the exit and length chosen each round from online agreement. Timed only when the
        # held-out agreement says some exit pays for its draft tokens and for the heads DEL's verify pass adds:
        # true of models trained for early exit (LayerSkip), rarely of others.
        del_plan, measurements["del_estimate"] = cand.del_candidate(
            sm.captured,
            agreement,
            max_draft=settings.max_draft,
            exits=settings.del_exits,
            min_gain=settings.min_gain,
            lookup=lookup,
        )
        if del_plan is not None:
            timer.time_programs([([del_plan], {"del_exits": del_plan.del_exits})])

    # 4. choose
    return timer.choose()


def _time_trees(sm, timer, text, settings: CalibrationSettings, lookup: dict, lookup_tps: float) -> dict:
    """Time draft trees, lookup's continuations plus recycled tokens along Sequoia's best template for each
    budget, from the acceptance per depth and rank that the calibration text shows (if the verify program can
    take a tree at all; passes/tree_verify.py). Returns the fields of the fastest of lookup and the trees."""
    front, front_tps = dict(lookup), lookup_tps
    if not settings.tree_budgets:
        return front
    try:
        check_tree_verify(sm)
    except SpecPassError as e:
        timer.measurements["trees_refused"] = str(e)
        return front
    # Replayed on the text of the prompts that are not timed: a table that had seen the timed prompts' own
    # continuations would propose them verbatim and flatter every tree.
    untimed = len(text.input_ids) - settings.timed_prompts
    accept, table = cand.recycled_acceptance(text, settings.recycled_k, untimed)
    sm.recycled.next.update(table)  # time trees with a table as warm as a running model's
    timer.measurements["recycled_acceptance"] = [[round(a, 4) for a in row] for row in accept]
    # Budgets in increasing order until one is slower than the best so far: a bigger tree accepts more but costs
    # more per verify, and where the verify cost jumps (at 4 tokens on a 2-core CPU) every larger budget loses.
    for budget in sorted(settings.tree_budgets):
        template, expected = best_tree(accept, budget)
        fields = {**lookup, "tree_budget": budget, "tree_template": [list(t) for t in template]}
        record = {**fields, "expected_recycled_tokens": round(expected, 3)}
        tps = timer.time(SpecPlan(speculate=True, max_draft=0, **fields), record)
        if tps <= front_tps:
            break
        front, front_tps = fields, tps
    return front


class _Timer:
    """Times candidates generating, against plain decoding, within the ledger's budget; remembers the fastest.

    A candidate is timed only if its estimated time (and, for a draft program, a compile) fits in what is
    left of the budget; results already in the ledger (a resumed search) are not timed again.
    """

    def __init__(self, sm, ledger: Ledger, prompts, settings, measurements: dict, progress: bool):
        self.sm, self.ledger, self.prompts, self.settings = sm, ledger, prompts, settings
        self.measurements = measurements
        # at most: plain, the lookups, the trees (they stop at the first that is slower), two variants of each
        # draft program, DEL
        most = 2 + len(settings.lookup_tokens) * len(settings.lookup_min_ngrams) + len(settings.tree_budgets)
        most += 2 * settings.finalists
        self.bar = progress_bar(desc="specpass: timing candidates", total=most, unit="candidate", enabled=progress)
        self.timed = measurements.setdefault("timed", [])
        self.skipped: list[dict] = []
        self.best, self.best_tps = None, 0.0
        self.fastest, self.fastest_tps = None, 0.0  # kept for speculate=True even when plain decoding wins
        self.compile_s = 60.0  # a draft program's compile, until one is measured
        self.plain = self._measure("plain", None)
        self.run_s = self.ledger.get("plain run s", 0.0)
        measurements["plain_tokens_per_s"] = self.plain

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def _measure(self, name: str, plan) -> float:
        if name not in self.ledger:
            t0 = time.perf_counter()
            tps = tokens_per_s(self.sm, plan, self.prompts, self.settings.timed_tokens)
            if plan is None:
                self.ledger.put("plain run s", time.perf_counter() - t0)
            self.ledger.put(name, tps)
        self.bar.update()
        return self.ledger.get(name)

    def _fits(self, seconds: float, record: dict) -> bool:
        if self.ledger.left() >= seconds:
            return True
        log.info("not timed (the budget's %.0f s left): %s", self.ledger.left(), record)
        self.skipped.append(record)
        return False

    def time(self, plan: SpecPlan, record: dict) -> float:
        """Tokens/s of ``plan`` (its draft program built), or 0.0 if the budget leaves no time for it."""
        name = "timed " + json.dumps(record, sort_keys=True)
        if name not in self.ledger and not self._fits(1.5 * self.run_s, record):
            return 0.0
        tps = self._measure(name, plan)
        self.timed.append({**record, "plan": plan.describe(), "tokens_per_s": tps})
        if tps > self.best_tps:
            self.best, self.best_tps = dataclasses.replace(plan), tps
        if tps > self.fastest_tps:
            self.fastest, self.fastest_tps = dataclasses.replace(plan), tps
        return tps

    def time_programs(self, programs: list[tuple[list[SpecPlan], dict]]) -> None:
        """Time draft programs: per program, the variants (policies) that share it, and what describes it.

        The programs still to be timed that fit in the budget compile side by side first (all but one in child
        processes, into the program cache: two in about the time of one on 2 cores), then are timed in turn.
        """
        todo, compiles, runs = [], 0, 0
        for variants, record in programs:
            records = [{**record, **_policy_fields(v)} for v in variants]
            left = sum("timed " + json.dumps(r, sort_keys=True) not in self.ledger for r in records)
            rounds = -(-(compiles + 1) // 2)  # compiles run two at a time
            if left and not self._fits(rounds * self.compile_s + 1.5 * self.run_s * (runs + left), record):
                continue
            todo.append((variants, records, left))
            compiles, runs = compiles + bool(left), runs + left
        compiling = [variants[0] for variants, _, left in todo if left]
        if compiling:
            t0 = time.perf_counter()
            started = [start_draft_program(self.sm, plan) for plan in compiling[1:]]
            try:
                build_draft_programs(self.sm, compiling[0])
                for pending in started:
                    resolve(pending)
            finally:
                for pending in started:
                    cancel(pending)  # those not resolved: an error or an interrupt here
            self.compile_s = max(time.perf_counter() - t0, 1.0)
        for variants, records, left in todo:
            if left:
                build_draft_programs(self.sm, variants[0])  # from the program cache where it was compiled above
            for plan, r in zip(variants, records, strict=True):
                self.time(plan, r)

    def choose(self) -> SpecPlan:
        """The fastest plan if it beats plain decoding by ``min_gain``, else no speculation (with the fastest
        draft kept for ``speculate=True``); every measurement in ``plan.measurements``."""
        m, plain = self.measurements, self.plain
        complete = not self.skipped
        m["search"] = {
            "kind": "full",
            "complete": complete,
            "budget_s": self.ledger.budget_s,
            "timed": len(self.timed),
            "not_timed": self.skipped,
            "resumed": len(self.ledger.resumed) > 0,
        }
        if self.best is None or self.best_tps <= plain * (1 + self.settings.min_gain):
            plan = dataclasses.replace(self.fastest, speculate=False) if self.fastest else SpecPlan(speculate=False)
            plan.reason = (
                f"no draft beat plain compiled decoding: best {self.fastest_tps:.1f} tok/s vs {plain:.1f} plain"
            )
        else:
            plan = self.best
            plan.reason = f"{self.best_tps:.1f} tok/s vs {plain:.1f} plain ({self.best_tps / plain:.2f}x)"
        plan.search = "full"
        m["calibration_s"] = self.ledger.elapsed()
        plan.measurements = m
        if not complete:
            log.warning(
                "the search's budget (%.0f s) left %d candidates untimed; run it again to time them (it resumes)",
                self.ledger.budget_s,
                len(self.skipped),
            )
        log.info("calibration chose: %s; %s", plan.describe(), plan.reason)
        return plan


def _policy_fields(plan: SpecPlan) -> dict:
    return {"adaptive": plan.adaptive, "threshold": plan.threshold, "draft_topk": plan.draft_topk}


def calibrate(
    model: nn.Module,
    prompts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    backend: str = "inductor",
    max_cache_len: int | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
    exact_lowbit: bool = True,
    search: str = "full",
    budget_s: float | None = None,
) -> SpecPlan:
    """Calibrate ``model`` and return a SpecPlan (pass it back with ``optimize(model, plan=plan)``).

    ``prompts``: texts (with ``tokenizer``) or token-id lists; default: a built-in set of 24 prompts.
    ``exact_lowbit``: as in optimize (the plan is timed with the programs optimize will build). ``search`` and
    ``budget_s``: as in calibrate_compiled.
    """
    sm = compile_plain(
        model, backend=backend, max_cache_len=max_cache_len, progress=progress, exact_lowbit=exact_lowbit
    )
    plan = calibrate_compiled(
        sm, prompts, tokenizer=tokenizer, settings=settings, progress=progress, search=search, budget_s=budget_s
    )
    plan.model_hash = model_hash(model, exact_lowbit=exact_lowbit)
    return plan


__all__ = ["DEFAULT_PROMPTS", "SEARCHES", "CalibrationSettings", "calibrate", "calibrate_compiled"]
