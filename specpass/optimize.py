"""``specpass.optimize(model)``: capture, rewrite, lower, and wrap the programs in a generate()-able model."""

from __future__ import annotations

import logging
import time

from torch import nn

from specpass.errors import SpecPassError
from specpass.lower import BACKENDS
from specpass.programs import SpecModel, compile_plain, speculate_with

log = logging.getLogger("specpass")

__all__ = ["SpecModel", "optimize"]


def optimize(
    model: nn.Module,
    *,
    speculate: bool | str = "auto",
    plan=None,
    tokenizer=None,
    prompts=None,
    backend: str = "inductor",
    max_cache_len: int | None = None,
    progress: bool = True,
    recalibrate: bool = False,
    calibrate: str = "quick",
    budget_s: float | None = None,
    cuda_graphs: bool | None = None,
    exact_lowbit: bool | str = True,
    isa: str | None = None,
) -> SpecModel:
    """Compile ``model`` for lossless generation.

    ``speculate="auto"`` calibrates (or reuses a cached SpecPlan, or takes ``plan=``) and speculates only when
    a draft measured faster than plain compiled decoding; ``True`` always speculates (the best draft found);
    ``False`` compiles plain decoding only. ``tokenizer``/``prompts`` feed calibration (see specpass.calibrate);
    ``recalibrate=True`` calibrates even when a cached plan exists (and replaces it). ``calibrate``: the search
    run when there is no cached plan: "quick" (seconds: context lookup timed against plain decoding) or "full"
    (minutes: every draft, within ``budget_s`` seconds if given, resumable; what ``specpass tune`` runs); a
    cached full plan is always used, a cached quick plan unless ``calibrate="full"``. ``cuda_graphs``: replay
    the decode, verify and draft programs from CUDA graphs (runtime/cuda_graphs.py); default: on a CUDA model.
    ``exact_lowbit``: read fp32 CPU weights that lie exactly on a quantization block grid (a model loaded from a
    GGUF file) as their blocks (passes/exact_lowbit.py; lossless, the weights are the same numbers) wherever the
    low-bit kernel is faster than fp32 on this CPU (timed once per CPU, kernels/choice.py); ``"always"``
    wherever a weight lies on a grid, without timing; False keeps every weight in fp32. ``isa``: the x86-64
    level a CPU model's programs are compiled for, ``"avx512"``, ``"avx2"`` or ``"generic"`` (default: the best
    this CPU runs); an engine written from them (write_engine) runs on every CPU of that level.

    A bf16 or fp16 model is compiled in its own dtype (KV cache, masks, constants) and generates what HF
    ``generate`` does in that dtype, up to near-ties of its top-2 logits (bench.near_tie_threshold).
    """
    from specpass.tune.plan import SEARCHES, SpecPlan, cached_plan, model_hash, plan_cache_dir

    if speculate not in (True, False, "auto"):
        raise SpecPassError(f"speculate must be True, False or 'auto', got {speculate!r}")
    if plan is not None and not isinstance(plan, SpecPlan):
        raise SpecPassError(f"plan must be a specpass.SpecPlan (SpecPlan.load(path)), got {type(plan).__name__}")
    if calibrate not in SEARCHES:
        raise SpecPassError(f"calibrate must be one of {', '.join(SEARCHES)}, got {calibrate!r}")
    if backend not in BACKENDS:
        raise SpecPassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    sm = compile_plain(
        model,
        backend=backend,
        max_cache_len=max_cache_len,
        progress=progress,
        cuda_graphs=cuda_graphs,
        exact_lowbit=exact_lowbit,
        isa=isa,
    )
    if speculate is False:
        log.info("optimized %s with %s in %.1fs", type(model).__name__, backend, sm.compile_s)
        return sm

    if plan is None:
        key = model_hash(model, exact_lowbit=exact_lowbit)
        plan = None if recalibrate else cached_plan(key)
        if plan is not None and (plan.search == "full" or calibrate == "quick"):
            log.info("using the cached SpecPlan %s: %s", plan_cache_dir() / f"{key}.json", plan.describe())
        else:
            from specpass.tune.calibrate import calibrate_compiled

            if tokenizer is None:
                tokenizer = _find_tokenizer(model)
            plan = calibrate_compiled(
                sm,
                prompts,
                tokenizer=tokenizer,
                progress=progress,
                search=calibrate,
                budget_s=budget_s,
                resume=calibrate == "full",
            )
            plan.model_hash = key
            plan.save(plan_cache_dir() / f"{key}.json")
        if plan.search == "quick":
            log.info("the plan comes from the quick search; `specpass tune` runs the full one (minutes)")
    if speculate == "auto" and not plan.speculate:
        plan.check(model)
        log.info("speculate='auto': plain compiled decoding (%s)", plan.reason or "the plan says no speculation")
        sm.plan = plan
    else:
        speculate_with(sm, plan)
    sm.compile_s = time.perf_counter() - t0
    log.info("optimized %s with %s in %.1fs: %s", type(model).__name__, backend, sm.compile_s, sm.plan.describe())
    return sm


def _find_tokenizer(model: nn.Module):
    """The model's tokenizer when its files are where the model came from; None otherwise."""
    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - calibration then uses token prompts; say why
        log.info("no tokenizer found at %s (%s); calibration prompts will be token ids", source, type(e).__name__)
        return None
