"""Calibration and autotune: choose the draft, its head size and its draft length by measured speed.

1. Calibration text: the model's own greedy continuations of calibration prompts (a built-in set, or the
   user's), teacher-forced once more to read every layer's hidden state and the final distribution.
2. Token frequencies of the model's own predictions rank the vocabulary for the pruned draft head (FR-Spec).
3. Per-layer agreement with the final layer, through the model's own final norm and head (LayerSkip's
   observation: untrained early exits rarely agree), and one trained exit adapter per candidate exit layer
   (Kangaroo), distilled from the final distribution, within a time budget.
4. Skip sets (SWIFT-style search): a few layer sets scored by agreement on the same text.
5. Each candidate's expected tokens per verify step comes from its agreement runs on held-out text; its
   cost from measured program times (verify at 1..k+1 tokens, the head at full and pruned size). The best
   few are compiled and *timed generating*, against plain compiled decoding; the plan keeps the fastest,
   and says "no speculation" when plain decoding wins. Context lookup and draft trees (Sequoia templates over
   recycled tokens; a draft program's greedy chain or EAGLE-2 tree inside them) are timed the same way.
6. DEL: from the per-layer agreement of step 3 and the parameters each exit reads, the exits where DEL's
   rate is best; a DEL plan over them is timed only if that rate promises to beat plain decoding.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from specpass.errors import SpecPassError
from specpass.models import chat_ids
from specpass.programs import build_draft_programs, check_tree_verify, compile_plain, del_costs, del_param_costs
from specpass.runtime.dynamic_exit import ExitChooser
from specpass.tune.adapter import ExitAdapter
from specpass.tune.plan import SpecPlan, model_hash
from specpass.tune.tree_shape import best_tree

log = logging.getLogger("specpass.tune")

#: built-in calibration prompts: a spread of tasks (chat, code, maths, extraction, translation, summary)
DEFAULT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when to use one.",
    "What are the main causes of inflation? Answer in a few sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Translate into French: The weather is nice today and we are going to the park.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "List five tips for staying productive while working from home.",
    "If a train travels 120 km in 1.5 hours, what is its average speed? Show your steps.",
    "Describe the water cycle to a ten-year-old.",
    "Write an email to a colleague asking to reschedule a meeting to Thursday.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for a simple tomato pasta.",
    "Explain the theory of evolution by natural selection.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of regular exercise?",
    "Solve for x: 3x + 7 = 22. Explain each step.",
    "Write a SQL query that returns the ten most recent orders from an orders table.",
    "Compare renewable and non-renewable energy sources.",
    "What should I pack for a three-day hiking trip?",
    "Explain what a neural network is in simple terms.",
    "Write a limerick about a cat who loves to code.",
    "How do vaccines train the immune system?",
    "Give three arguments for and against school uniforms.",
    "Extract the dates from this text: The meeting moved from 3 May 2021 to 14 June 2021.",
)


@dataclasses.dataclass
class CalibrationSettings:
    new_tokens: int = 48  # greedy continuation length per calibration prompt
    vocab_sizes: tuple[int, ...] = (2048, 4096, 8192, 16384)  # pruned-head sizes to consider
    exit_fractions: tuple[float, ...] = (0.2, 0.4)  # candidate exit layers, as fractions of depth
    adapter_rank: int = 64
    train_seconds: float = 60.0  # per exit adapter (the bound: all training under 10 minutes)
    max_draft: int = 4
    skip_candidates: int = 4  # SWIFT-style skip sets scored
    timed_prompts: int = 6  # prompts generated to time each candidate (fewer: a few-percent noise decides)
    timed_tokens: int = 96
    finalists: int = 2  # candidates compiled and timed against plain decoding
    lookup_tokens: tuple[int, ...] = (1, 2, 3)  # context-lookup draft lengths timed (0 in a plan: no lookup)
    lookup_min_ngrams: tuple[int, ...] = (1, 2)
    tree_budgets: tuple[int, ...] = (2, 3, 4, 6, 8, 16)  # draft-tree sizes (nodes per verify, root included)
    recycled_k: int = 4  # recycled-token candidates per token considered for tree templates
    min_gain: float = 0.05  # a draft must beat plain decoding by this much: timing noise is a few percent
    del_exits: int = 3  # DEL's candidate exits, where the held-out agreement of plain exits says one may pay


@dataclasses.dataclass
class _Text:
    """Teacher-forced calibration text: per position, hidden states and the target's choice."""

    hidden: dict[int, torch.Tensor]  # layer k -> (P, H) hidden state after layer k (every layer but the last)
    target: torch.Tensor  # (P,) the model's greedy next token at each position
    target_logits: torch.Tensor  # (P, N_max) the model's logits over the frequency-ranked ids
    generated: torch.Tensor  # (P,) bool: the next token is the model's own continuation (runs are valid)
    held_out: torch.Tensor  # (P,) bool: evaluation positions (prompts not used for frequencies or training)
    input_ids: list[torch.Tensor]  # per calibration sequence, (1, T) ids for skip-set scoring
    prompt_lens: list[int]  # per sequence, where the model's own continuation starts


def _prompt_ids(model, prompts: Sequence[str] | None, tokenizer) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    if tokenizer is None:
        if prompts is not None and any(isinstance(p, str) for p in prompts):
            raise SpecPassError("calibration prompts given as text need a tokenizer: pass tokenizer=")
        if prompts is None:
            log.info("no tokenizer: calibrating on the model's continuations of random token prompts")
            vocab = model.get_output_embeddings().weight.shape[0]
            g = torch.Generator().manual_seed(0)
            return [torch.randint(0, vocab, (1, 8), generator=g).to(device) for _ in range(12)]
        return [torch.as_tensor(p, device=device).reshape(1, -1) for p in prompts]
    return [chat_ids(tokenizer, text).to(device) for text in prompts or DEFAULT_PROMPTS]


def _final_norm_and_head(model, structure) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    path = structure.final_norm_path
    norm = model.get_submodule(path.removeprefix("model.")) if path else nn.Identity()
    return norm, head


def _collect(sm, prompt_ids, settings, progress) -> tuple[_Text, torch.Tensor]:
    """Generate the calibration text with the compiled plain programs and teacher-force it through HF."""
    model = sm.model
    n_layers = len(sm.captured.structure.layers)
    vocab = model.get_output_embeddings().weight.shape[0]
    n_eval = max(1, len(prompt_ids) // 3)
    seqs, starts = [], []
    # A prompt longer than the cache allows keeps its end: calibration needs in-distribution continuations,
    # not whole prompts, and a cache sized to one short request must still calibrate.
    new_tokens = min(settings.new_tokens, sm.max_cache_len // 2)
    if new_tokens < 2:
        raise SpecPassError(
            f"max_cache_len={sm.max_cache_len} is too small to calibrate a draft: pass max_cache_len >= 4, "
            "or speculate=False"
        )
    keep, truncated = sm.max_cache_len - new_tokens, 0
    for ids in tqdm(prompt_ids, desc="specpass: calibration text", disable=not progress):
        if ids.shape[1] > keep:
            ids, truncated = ids[:, -keep:], truncated + 1
        out = sm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
        seqs.append(out)
        starts.append(ids.shape[1])
    if len(seqs) < 2:
        raise SpecPassError(f"calibration needs at least 2 prompts, got {len(seqs)}: pass more prompts=")
    if truncated:
        log.info(
            "kept the last %d tokens of %d calibration prompts (max_cache_len=%d)", keep, truncated, sm.max_cache_len
        )
    all_hidden: dict[int, list] = {k: [] for k in range(n_layers - 1)}
    targets, finals, generated, held_out = [], [], [], []
    with torch.no_grad():
        for j, seq in enumerate(seqs):
            out = model(seq, output_hidden_states=True)
            hs = out.hidden_states  # hs[k + 1]: the output of layer k (k < n_layers - 1)
            for k in range(n_layers - 1):
                all_hidden[k].append(hs[k + 1][0, :-1])
            targets.append(out.logits[0, :-1].argmax(-1))
            finals.append(out.logits[0, :-1])
            t = seq.shape[1] - 1
            gen = torch.zeros(t, dtype=torch.bool)
            gen[starts[j] - 1 :] = True  # position i predicts token i + 1: from the prompt's last token on
            generated.append(gen)
            held_out.append(torch.full((t,), j >= len(seqs) - n_eval))
    target = torch.cat(targets)
    held = torch.cat(held_out)
    # FR-Spec: rank the vocabulary by how often the model itself predicts each token (training prompts only).
    counts = torch.bincount(target[~held], minlength=vocab).float()
    counts += torch.bincount(target, minlength=vocab).float() * 1e-6  # ties: a held-out sighting ranks first
    n_max = min(max(settings.vocab_sizes), vocab)
    ranked = counts.argsort(descending=True)
    logits = torch.cat(finals)[:, ranked[:n_max]]
    text = _Text(
        hidden={k: torch.cat(v) for k, v in all_hidden.items()},
        target=target,
        target_logits=logits,
        generated=torch.cat(generated),
        held_out=held,
        input_ids=seqs,
        prompt_lens=starts,
    )
    return text, ranked


def _runs(agree: torch.Tensor, valid: torch.Tensor, cap: int) -> torch.Tensor:
    """At each valid position, how many consecutive draft tokens from there would be accepted (<= cap)."""
    n = agree.shape[0]
    run = torch.zeros(n + 1, dtype=torch.long)
    ok = agree & valid
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if ok[i] else 0
    return run[:n][valid].clamp(max=cap)


def _train_adapter(h, target_logits, norm, head_rows, settings, progress, desc) -> tuple[ExitAdapter, float]:
    """Distil the final distribution (over the ranked head rows) into an exit adapter; returns it and seconds.

    Trains in float32 whatever the model's dtype (``norm`` and ``head_rows`` float32 too): AdamW's small
    updates vanish in bf16. The draft program casts the adapter to the model's dtype (SpecPlan.draft_config).
    """
    torch.manual_seed(0)
    h = h.float()
    adapter = ExitAdapter(h.shape[1], settings.adapter_rank).to(h.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=2e-3, weight_decay=0.0)
    target = target_logits.float().log_softmax(-1)
    t0 = time.perf_counter()
    n = h.shape[0]
    batch = 256
    with tqdm(desc=desc, disable=not progress, unit="step") as bar:
        step = 0
        while time.perf_counter() - t0 < settings.train_seconds and step < 3000:
            idx = torch.randint(0, n, (min(batch, n),))
            with torch.enable_grad():
                logits = nn.functional.linear(norm(adapter(h[idx])), head_rows)
                loss = nn.functional.kl_div(logits.log_softmax(-1), target[idx], log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return adapter.eval().requires_grad_(False), time.perf_counter() - t0


def _time(fn, repeat: int = 7, device: torch.device | None = None) -> float:
    """Median seconds of ``fn()``; on a GPU until its kernels have run, not until they are queued."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_costs(sm, context: int, max_q: int) -> dict:
    """Seconds per verify call at q = 1..max_q tokens, and the head at full and pruned sizes (one token)."""
    from specpass.runtime.generate import _run

    cache = sm.cache
    device = cache.device
    costs = {"verify": {}}
    decode = sm.runnable_programs()["decode"]
    context = min(context, sm.max_cache_len - max_q - 1)
    with torch.no_grad():
        cache.reset()
        cache.commit(context)  # stale slots are fine for timing
        for q in range(1, max_q + 1):
            ids = torch.zeros((1, q), dtype=torch.long, device=device)
            # as generate() calls it: from CUDA graphs where the model replays them
            costs["verify"][q] = _time(lambda ids=ids: _run(decode, cache, ids), device=device)
        cache.reset()
    head = sm.model.get_output_embeddings().weight
    x = torch.randn(1, head.shape[1], device=head.device, dtype=head.dtype)
    costs["head"] = {head.shape[0]: _time(lambda: nn.functional.linear(x, head), 20, device=device)}
    return costs


def _head_cost(costs: dict, vocab: int, n: int) -> float:
    """The pruned head's cost, scaled from the measured full head (GEMV time is linear in rows)."""
    return costs["head"][vocab] * n / vocab


def calibrate_compiled(
    sm, prompts=None, *, tokenizer=None, settings: CalibrationSettings | None = None, progress: bool = True
) -> SpecPlan:
    """Calibrate with an already-compiled plain SpecModel (``optimize(model, speculate=False)``)."""

    settings = settings or CalibrationSettings()
    t_start = time.perf_counter()
    model, structure = sm.model, sm.captured.structure
    n_layers = len(structure.layers)
    vocab = model.get_output_embeddings().weight.shape[0]
    if n_layers < 2:
        return SpecPlan(speculate=False, reason=f"{n_layers} layer: no smaller draft inside the model")
    exits = sorted({min(n_layers - 2, max(0, round(n_layers * f) - 1)) for f in settings.exit_fractions})
    prompt_ids = _prompt_ids(model, prompts, tokenizer)
    text, ranked = _collect(sm, prompt_ids, settings, progress)
    norm, head = _final_norm_and_head(model, structure)
    sizes = sorted({min(n, vocab) for n in settings.vocab_sizes})
    # The adapters train and are scored in float32 (_train_adapter), on float32 copies of norm and head rows.
    norm32 = copy.deepcopy(norm).float()
    head_rows = head.weight[ranked[: text.target_logits.shape[1]]].float()
    train, held = ~text.held_out, text.held_out
    valid = text.generated & held
    measurements: dict = {"positions": int(text.target.shape[0]), "held_out_positions": int(valid.sum())}

    # Per-layer agreement of a plain early exit (no adapter), full head: LayerSkip's baseline.
    with torch.no_grad():
        measurements["agreement_no_adapter"] = {
            k: float(
                (nn.functional.linear(norm(h[valid]), head.weight).argmax(-1) == text.target[valid]).float().mean()
            )
            for k, h in text.hidden.items()
        }

    candidates = []  # (description dict, agreement (P,) bool over all positions)
    adapters: dict[int, ExitAdapter] = {}
    train_s = {}
    for k in exits:
        adapter, seconds = _train_adapter(
            text.hidden[k][train],
            text.target_logits[train],
            norm32,
            head_rows,
            settings,
            progress,
            f"specpass: exit adapter after layer {k}",
        )
        adapters[k], train_s[k] = adapter, seconds
        with torch.no_grad():
            logits = nn.functional.linear(norm32(adapter(text.hidden[k].float())), head_rows)
        for n in sizes:
            choice = ranked[logits[:, :n].argmax(-1)]
            candidates.append(({"exit_layer": k, "vocab": n, "active_layers": k + 1}, choice == text.target))
    measurements["adapter_train_s"] = train_s

    # SWIFT-style skip sets: skip every other layer in the upper part of the stack, at a few strides.
    g = torch.Generator().manual_seed(0)
    skip_sets = []
    for frac in (0.5, 0.4, 0.3)[: settings.skip_candidates]:
        body = list(range(1, n_layers - 1))
        count = max(1, round(len(body) * frac))
        skip_sets.append(sorted(torch.tensor(body)[torch.randperm(len(body), generator=g)[:count]].tolist()))
    for skip in skip_sets:
        logits = _skip_logits(model, structure, text, skip)
        for n in sizes:
            agree = ranked[logits[:, ranked[:n]].argmax(-1)] == text.target
            candidates.append(({"skip_layers": skip, "vocab": n, "active_layers": n_layers - len(skip)}, agree))

    # Cost model from measured times; expected tokens per verify from held-out agreement runs.
    context = int(statistics.median([s.shape[1] for s in text.input_ids]))
    costs = _measure_costs(sm, context, settings.max_draft + 1)
    measurements["verify_ms"] = {q: 1e3 * t for q, t in costs["verify"].items()}
    body = costs["verify"][1] - costs["head"][vocab]
    scored = []
    for desc, agree in candidates:
        n = desc["vocab"]
        draft_cost = body * desc["active_layers"] / n_layers + _head_cost(costs, vocab, n)
        for gamma in range(1, settings.max_draft + 1):
            tau = 1 + float(_runs(agree, valid, gamma).float().mean())
            cost = gamma * draft_cost + costs["verify"][gamma + 1]
            scored.append((tau / cost * costs["verify"][1], tau, gamma, desc))
    scored.sort(key=lambda s: -s[0])
    measurements["best_estimates"] = [
        {"speedup_estimate": round(s, 3), "tau": round(t, 3), "max_draft": gm, **d} for s, t, gm, d in scored[:6]
    ]

    # Time the finalists generating, against plain decoding.
    timed_ids = [s[:, :n] for s, n in zip(text.input_ids, text.prompt_lens, strict=True)]
    timed_ids = timed_ids[-settings.timed_prompts :]
    plain_tps = _tokens_per_s(sm, None, timed_ids, settings)
    measurements["plain_tokens_per_s"] = plain_tps
    best_plan, best_tps = None, plain_tps * (1 + settings.min_gain)
    fastest_draft, fastest_tps = None, 0.0  # kept for speculate=True even when plain decoding wins

    def consider(plan: SpecPlan, record: dict) -> float:
        nonlocal best_plan, best_tps, fastest_draft, fastest_tps
        tps = _tokens_per_s(sm, plan, timed_ids, settings)
        measurements.setdefault("timed", []).append({**record, "tokens_per_s": tps})
        if tps > best_tps:
            best_plan, best_tps = dataclasses.replace(plan), tps
        if tps > fastest_tps:
            fastest_draft, fastest_tps = dataclasses.replace(plan), tps
        return tps

    # Context lookup costs nothing to propose, so only measurement decides its length and n-gram size.
    lookup = {"lookup": 0, "lookup_min_ngram": 1}
    lookup_tps = plain_tps
    for n, min_n in tqdm(
        [(n, m) for n in settings.lookup_tokens for m in settings.lookup_min_ngrams],
        desc="specpass: timing context lookup",
        disable=not progress,
    ):
        fields = {"lookup": n, "lookup_min_ngram": min_n}
        tps = consider(SpecPlan(speculate=True, max_draft=0, **fields), fields)
        if tps > lookup_tps:
            lookup, lookup_tps = fields, tps
    # Draft trees: lookup's continuations plus recycled tokens along Sequoia's best template for each budget,
    # from the acceptance per depth and rank that the calibration text shows (if the verify program can take
    # a tree at all; passes/tree_verify.py).
    front, front_tps = dict(lookup), lookup_tps
    if settings.tree_budgets:
        try:
            check_tree_verify(sm)
        except SpecPassError as e:
            measurements["trees_refused"] = str(e)
        else:
            # Replayed on the text of the prompts that are not timed: a table that had seen the timed prompts'
            # own continuations would propose them verbatim and flatter every tree.
            untimed = len(text.input_ids) - len(timed_ids)
            accept, table = _recycled_acceptance(text, ranked, settings.recycled_k, untimed)
            sm.recycled.next.update(table)  # time trees with a table as warm as a running model's
            measurements["recycled_acceptance"] = [[round(a, 4) for a in row] for row in accept]
            # Budgets in increasing order until one is slower than the best so far: a bigger tree accepts more
            # but costs more per verify, and where the verify cost jumps (at 4 tokens on a 2-core CPU) every
            # larger budget loses too.
            for budget in tqdm(
                sorted(settings.tree_budgets), desc="specpass: timing draft trees", disable=not progress
            ):
                template, expected = best_tree(accept, budget)
                fields = {**lookup, "tree_budget": budget, "tree_template": [list(t) for t in template]}
                record = {**fields, "expected_recycled_tokens": round(expected, 3)}
                tps = consider(SpecPlan(speculate=True, max_draft=0, **fields), record)
                if tps <= front_tps:
                    break
                front, front_tps = fields, tps
    seen = set()
    finals = []
    for _, _tau, gamma, desc in scored:
        key = (desc.get("exit_layer"), tuple(desc.get("skip_layers", ())), desc["vocab"])
        if key in seen:
            continue
        seen.add(key)
        finals.append((gamma, desc))
        if len(finals) == settings.finalists:
            break
    for gamma, desc in tqdm(finals, desc="specpass: timing drafts", disable=not progress):
        # The draft program runs where lookup finds no match (with the best lookup or tree, if any beat plain).
        plan = SpecPlan(
            speculate=True,
            exit_layer=desc.get("exit_layer"),
            skip_layers=list(desc.get("skip_layers", [])),
            vocab_ids=None if desc["vocab"] >= vocab else sorted(ranked[: desc["vocab"]].tolist()),
            max_draft=gamma,
            **front,
        )
        if plan.exit_layer is not None:
            plan.set_adapter(adapters[plan.exit_layer])
        build_draft_programs(sm, plan)
        if plan.tree_draft:  # a greedy chain inside the tree, or EAGLE-2's dynamic tree (top-2 per level)
            variants = [{"draft_topk": k, "threshold": 0.3} for k in (1, 2)]
        else:  # fixed-length chains, or Draft&Verify's adaptive exit
            variants = [{"adaptive": a, "threshold": 0.3 if a else 0.0} for a in (False, True)]
        for variant in variants:
            plan = dataclasses.replace(plan, **variant)
            consider(plan, {**desc, "max_draft": gamma, **variant, **front})

    # DEL: plain early exits, the exit and length chosen each round from online agreement. Timed only when the
    # held-out agreement says some exit pays for its draft tokens and for the heads DEL's verify pass adds:
    # true of models trained for early exit (LayerSkip), rarely of others.
    del_plan = _del_candidate(sm, measurements, settings, lookup)
    if del_plan is not None:
        build_draft_programs(sm, del_plan)
        consider(del_plan, {"del_exits": del_plan.del_exits, **lookup})
    measurements["calibration_s"] = time.perf_counter() - t_start
    if best_plan is None:
        plan = dataclasses.replace(fastest_draft, speculate=False) if fastest_draft else SpecPlan(speculate=False)
        plan.reason = f"no draft beat plain compiled decoding: best {fastest_tps:.1f} tok/s vs {plain_tps:.1f} plain"
    else:
        plan = best_plan
        plan.reason = (
            f"{best_tps:.1f} tok/s vs {plain_tps:.1f} plain ({best_tps / plain_tps:.2f}x) on calibration prompts"
        )
    plan.measurements = measurements
    log.info("calibration chose: %s; %s", plan.describe(), plan.reason)
    return plan


def _del_candidate(sm, measurements: dict, settings: CalibrationSettings, lookup: dict) -> SpecPlan | None:
    """A DEL plan over the exits whose held-out agreement (``agreement_no_adapter``) promises the most tokens
    per unit of compute, if that promise beats plain decoding by ``min_gain``; else None (and why, in
    ``measurements["del_estimate"]``)."""

    agreement = measurements["agreement_no_adapter"]
    layers = sorted(agreement)
    drafts, _ = del_param_costs(sm.captured, layers)
    chooser = ExitChooser(layers, drafts, settings.max_draft)
    chooser.alpha = dict(agreement)
    gains = {k: max(chooser.rate(k, g) for g in range(1, settings.max_draft + 1)) for k in layers}
    exits = sorted(sorted(layers, key=gains.get, reverse=True)[: settings.del_exits])
    plan = SpecPlan(speculate=True, del_exits=exits, max_draft=settings.max_draft, threshold=0.3, **lookup)
    plan.del_costs = del_costs(sm.captured, plan)
    # The best round DEL expects, per plain pass: its verify pass reads the extra heads every round.
    chooser = ExitChooser(exits, plan.del_costs, settings.max_draft)
    chooser.alpha = {k: agreement[k] for k in exits}
    _, verify = del_param_costs(sm.captured, exits)
    estimate = max(chooser.rate(k, g) for k in exits for g in range(settings.max_draft + 1)) / verify
    measurements["del_estimate"] = {"exits": exits, "tokens_per_plain_pass": round(estimate, 3)}
    return plan if estimate > 1 + settings.min_gain else None


def _recycled_acceptance(
    text: _Text, ranked: torch.Tensor, k: int, sequences: int, depths: int = 6
) -> tuple[list[list[float]], dict[int, list[int]]]:
    """Token Recycling's acceptance per depth and rank, replayed on the calibration text: walking each greedy
    continuation in order, the table holds every earlier position's top-k, and at each position a tree rooted
    there would find the true token d + 1 ahead at some rank of the table's row for the token d ahead.
    As at run time, only generated positions (not the prompt) fill the table, and it carries over prompts.
    Replays the first ``sequences`` sequences; returns the acceptance and the table at the end."""
    top = ranked[text.target_logits.topk(k, dim=-1).indices].tolist()
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


def _tokens_per_s(sm, plan, timed_ids, settings) -> float:
    previous, table = sm.plan, dict(sm.recycled.next)
    sm.plan = plan
    try:
        room = [min(settings.timed_tokens, sm.max_cache_len - ids.shape[1]) for ids in timed_ids]
        sm.generate(timed_ids[0], max_new_tokens=min(8, room[0]), do_sample=False, eos_token_id=[])  # warm-up
        tokens = seconds = 0.0
        for ids, n in zip(timed_ids, room, strict=True):
            sm.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[])
            tokens += sm.last_stats.new_tokens
            seconds += sm.last_stats.total_s
    finally:
        # Every candidate starts from the same recycled-token table: one that had generated the timed prompts
        # before would hand the next candidate their continuations verbatim.
        sm.plan, sm.recycled.next = previous, table
    return tokens / seconds


def _skip_logits(model, structure, text: _Text, skip: list[int]) -> torch.Tensor:
    """Teacher-forced logits (P, V) of the model with the ``skip`` layers turned into identities."""
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
    return logits


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
) -> SpecPlan:
    """Calibrate ``model`` and return a SpecPlan (pass it back with ``optimize(model, plan=plan)``).

    ``prompts``: texts (with ``tokenizer``) or token-id lists; default: a built-in set of 24 prompts.
    ``exact_lowbit``: as in optimize (the plan is timed with the programs optimize will build).
    """
    sm = compile_plain(
        model, backend=backend, max_cache_len=max_cache_len, progress=progress, exact_lowbit=exact_lowbit
    )
    plan = calibrate_compiled(sm, prompts, tokenizer=tokenizer, settings=settings, progress=progress)
    plan.model_hash = model_hash(model, exact_lowbit=exact_lowbit)
    return plan


__all__ = ["DEFAULT_PROMPTS", "CalibrationSettings", "calibrate", "calibrate_compiled"]
