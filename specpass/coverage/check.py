"""One architecture of ``specpass coverage``: build it tiny, greedy-decode with specpass (plainly and with forced
speculation) and with HF, and classify the outcome (the statuses are the package docstring's)."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
import warnings

from specpass.tiny_models import VOCAB, build_tiny_model

log = logging.getLogger("specpass.coverage")

LOSSLESS, FAILED, SKIPPED, CRASH, MISMATCH = "lossless", "failed", "skipped", "crash", "mismatch"
STATUSES = (LOSSLESS, FAILED, SKIPPED, CRASH, MISMATCH)
#: statuses that are specpass bugs (the coverage test fails on them)
BUGS = (CRASH, MISMATCH)

PROMPT_LEN = 6
NEW_TOKENS = 4
MAX_CACHE_LEN = 16
#: the plan every architecture is also decoded with: context lookup, else an early exit after the first layer,
#: drafting whatever it is unsure of too (threshold 0), so that verification both accepts and rejects
FORCED_PLAN_FIELDS = dict(speculate=True, lookup=2, exit_layer=0, max_draft=3, threshold=0.0, adaptive=False)


@dataclasses.dataclass(frozen=True)
class CoverageResult:
    model_type: str
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def first_line(e: BaseException) -> str:
    """'Type: message', the message's first line (and the next one where the first only introduces it)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    out = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return out if len(out) <= 240 else out[:237] + "..."


def _default_config_builds(model_type: str) -> str | None:
    """None if transformers can instantiate its own default config of ``model_type`` (on the meta device),
    else why not: tells a transformers limitation from a tiny config that this module got wrong."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        return first_line(e)
    return None


def _greedy_by_forward(model, prompt, n: int):
    """Greedy continuation from full forwards without a cache: the model's own definition of its logits."""
    import torch

    ids = prompt
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def check_architecture(model_type: str) -> CoverageResult:
    """Build a tiny ``model_type``, greedy-decode with specpass and with HF, and classify the outcome."""
    import torch

    from specpass.errors import SpecPassError
    from specpass.optimize import optimize
    from specpass.tune.plan import SpecPlan

    forced_plan = SpecPlan(**FORCED_PLAN_FIELDS)
    t0 = time.perf_counter()

    def result(status: str, reason: str = "") -> CoverageResult:
        return CoverageResult(model_type, status, reason, round(time.perf_counter() - t0, 2))

    try:
        model = build_tiny_model(model_type)
    except Exception as e:  # noqa: BLE001 - transformers cannot build it: not ours to judge
        default = _default_config_builds(model_type)
        if default is not None:
            return result(SKIPPED, f"transformers cannot build its default config: {default}")
        return result(SKIPPED, f"the tiny config is invalid for this architecture: {first_line(e)}")
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None and hasattr(head, "weight") else VOCAB
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, min(vocab, VOCAB), (1, PROMPT_LEN), generator=gen)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                eos_token_id=None,
                pad_token_id=0,
            )
    except Exception as e:  # noqa: BLE001 - HF's own greedy decode fails: nothing to compare against
        return result(SKIPPED, f"transformers' own generate fails on the tiny model: {first_line(e)}")
    try:
        spec_model = optimize(model, plan=forced_plan, speculate=True, backend="eager", max_cache_len=MAX_CACHE_LEN)
        got = spec_model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False, speculate=False)
        speculated = spec_model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    except SpecPassError as e:
        return result(FAILED, " ".join(str(e).split())[:400])
    except Exception as e:  # noqa: BLE001 - anything else escaping specpass is a bug: report it as a crash
        log.debug("crash on %s:\n%s", model_type, traceback.format_exc())
        return result(CRASH, first_line(e))
    # Each output judged on its own: equal to HF's, or different only where HF's top-2 logits tie.
    notes, by_forward = [], None
    for label, out in (("plain decoding", got), ("speculative decoding", speculated)):
        if out.shape == expected.shape and torch.equal(out, expected):
            continue
        theirs, ours = expected[0, PROMPT_LEN:].tolist(), out[0, PROMPT_LEN:].tolist()
        if by_forward is None:
            try:
                with torch.no_grad():
                    by_forward = _greedy_by_forward(model, prompt, NEW_TOKENS)
            except Exception:  # noqa: BLE001 - no second opinion available
                by_forward = False
        if by_forward is not False and not torch.equal(by_forward, expected) and torch.equal(by_forward, out):
            return result(
                SKIPPED,
                f"transformers' generate ({theirs}) disagrees with the model's own forward ({ours}) on the tiny "
                f"model; specpass's {label} matches the forward",
            )
        gap = _tie_gap(model, expected, out)
        if gap is None:
            return result(MISMATCH, f"{label}: specpass {ours} != HF {theirs}")
        notes.append(f"{label}: tokens differ only where HF's top-2 logits tie within float noise (gap {gap:.1e})")
    return result(LOSSLESS, "; ".join(notes))


def _tie_gap(model, expected, got, rel: float = 1e-5) -> float | None:
    """The top-2 logit gap where the two sequences first diverge, if it is within float noise (else None).

    Two correct implementations may order a near-tie differently (another kernel, another CPU); anything
    larger is a real difference.
    """
    import torch

    n = min(expected.shape[1], got.shape[1])
    diverge = next((i for i in range(n) if expected[0, i] != got[0, i]), None)
    if diverge is None or diverge == 0:
        return None
    try:
        with torch.no_grad():
            logits = model(input_ids=expected[:, :diverge], use_cache=False).logits[0, -1].float()
    except Exception:  # noqa: BLE001 - no second opinion available
        return None
    top = logits.topk(2).values
    gap = float(top[0] - top[1])
    tied = {int(expected[0, diverge]), int(got[0, diverge])} <= set(logits.topk(2).indices.tolist())
    return gap if tied and gap <= rel * max(1.0, float(logits.abs().max())) else None
