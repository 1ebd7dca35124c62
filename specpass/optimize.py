"""``specpass.optimize(model)``: capture, rewrite, lower, and wrap the programs in a generate()-able model."""

from __future__ import annotations

import dataclasses
import logging
import time

from torch import nn
from tqdm.auto import tqdm

from specpass.capture import CapturedGraph, capture, example_inputs, program_dynamic_shapes
from specpass.errors import SpecPassError
from specpass.graph_text import summary
from specpass.lower import BACKENDS, lower
from specpass.passes import PIPELINES, DraftConfig, draft_pipeline, run_passes
from specpass.runtime.dynamic_exit import VERIFY_EXITS, draft_program_name
from specpass.runtime.model import CompiledLM

log = logging.getLogger("specpass")


class SpecModel(CompiledLM):
    """A compiled HF causal LM. ``generate`` returns what ``model.generate`` would, faster."""

    def __init__(self, model: nn.Module, captured: CapturedGraph, programs: dict, backend: str, compile_s: float):
        super().__init__(
            programs,
            captured.spec,
            vocab_size=model.get_output_embeddings().weight.shape[0],
            generation_config=getattr(model, "generation_config", None),
            device=next(model.parameters()).device,
        )
        self.model = model
        self.config = model.config
        self.captured = captured
        self.backend = backend
        self.compile_s = compile_s
        self._draft_key = None
        self.summaries: dict[str, dict] = {}  # program -> graph_text.summary of its rewritten graph


def optimize(
    model: nn.Module,
    *,
    speculate: bool | str = "auto",
    plan=None,
    tokenizer=None,
    prompts=None,
    backend: str = "inductor",
    max_cache_len: int = 1024,
    progress: bool = True,
    recalibrate: bool = False,
    cuda_graphs: bool | None = None,
) -> SpecModel:
    """Compile ``model`` for lossless generation.

    ``speculate="auto"`` calibrates (or reuses a cached SpecPlan, or takes ``plan=``) and speculates only when
    a draft measured faster than plain compiled decoding; ``True`` always speculates (the best draft found);
    ``False`` compiles plain decoding only. ``tokenizer``/``prompts`` feed calibration (see specpass.calibrate);
    ``recalibrate=True`` calibrates even when a cached plan exists (and replaces it). ``cuda_graphs``: replay
    the decode, verify and draft programs from CUDA graphs (runtime/cuda_graphs.py); default: on a CUDA model.

    A bf16 or fp16 model is compiled in its own dtype (KV cache, masks, constants) and generates what HF
    ``generate`` does in that dtype, up to near-ties of its top-2 logits (bench.near_tie_threshold).
    """
    from specpass.tune.plan import SpecPlan, cached_plan, model_hash, plan_cache_dir

    if speculate not in (True, False, "auto"):
        raise SpecPassError(f"speculate must be True, False or 'auto', got {speculate!r}")
    if plan is not None and not isinstance(plan, SpecPlan):
        raise SpecPassError(f"plan must be a specpass.SpecPlan (SpecPlan.load(path)), got {type(plan).__name__}")
    if backend not in BACKENDS:
        raise SpecPassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    captured = capture(model, max_cache_len=max_cache_len)
    programs = {}
    device = next(model.parameters()).device
    summaries = {}
    for name in tqdm(("prefill", "decode"), desc=f"specpass: compiling ({backend})", disable=not progress):
        gm = run_passes(captured.gm, PIPELINES[name], captured.structure)
        summaries[name] = summary(gm)
        # decode takes any number of tokens: one in plain decoding, the verified chain in speculation.
        programs[name] = lower(
            gm,
            backend,
            name=name,
            example_args=example_inputs(captured.spec, q=2, device=device),
            dynamic_shapes=program_dynamic_shapes(captured.spec, dynamic_q=True, rewritten=True),
        )
    sm = SpecModel(model, captured, programs, backend, time.perf_counter() - t0)
    sm.summaries = summaries
    if cuda_graphs is not None:
        if cuda_graphs and device.type != "cuda":
            raise SpecPassError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}")
        sm.cuda_graphs = cuda_graphs
    if speculate is False:
        log.info("optimized %s with %s in %.1fs", type(model).__name__, backend, sm.compile_s)
        return sm

    if plan is None:
        key = model_hash(model)
        plan = None if recalibrate else cached_plan(key)
        if plan is not None:
            log.info("using the cached SpecPlan %s: %s", plan_cache_dir() / f"{key}.json", plan.describe())
        else:
            from specpass.tune.calibrate import calibrate_compiled

            if tokenizer is None:
                tokenizer = _find_tokenizer(model)
            plan = calibrate_compiled(sm, prompts, tokenizer=tokenizer, progress=progress)
            plan.model_hash = key
            plan.save(plan_cache_dir() / f"{key}.json")
    plan.check(model)
    if speculate == "auto" and not plan.speculate:
        log.info("speculate='auto': plain compiled decoding (%s)", plan.reason or "the plan says no speculation")
        sm.plan = plan
    elif not plan.drafts:
        raise SpecPassError(f"speculate=True but the plan has no draft ({plan.reason}); pass speculate='auto'")
    else:
        if plan.tree_budget:
            check_tree_verify(sm)
        if plan.del_exits and not plan.del_costs:
            plan = dataclasses.replace(plan, del_costs=del_costs(captured, plan))
        build_draft_programs(sm, plan)
        sm.plan = dataclasses.replace(plan, speculate=True)
    sm.compile_s = time.perf_counter() - t0
    log.info("optimized %s with %s in %.1fs: %s", type(model).__name__, backend, sm.compile_s, sm.plan.describe())
    return sm


def check_tree_verify(sm: SpecModel) -> None:
    """Raise SpecPassError unless the decode program can verify draft trees (passes/tree_verify.py)."""
    if "verify" not in sm.summaries:
        gm = run_passes(sm.captured.gm, PIPELINES["verify"], sm.captured.structure)
        sm.summaries["verify"] = summary(gm)


def build_draft_programs(sm: SpecModel, plan) -> None:
    """Run the draft passes for ``plan`` and lower the draft program (a one-token step; any number of tokens
    for draft trees) into ``sm.programs``; a plan without one (lookup only) leaves none there."""
    key = plan.draft_key() if plan.has_draft else None
    if sm._draft_key == key:
        return
    for name in [n for n in sm.programs if n not in ("prefill", "decode")]:
        sm.programs.pop(name)
        sm.summaries.pop(name, None)
    sm._draft_key = None
    if not plan.has_draft:
        return
    device = next(sm.model.parameters()).device
    if plan.del_exits:
        _build_del_programs(sm, plan, device)
        sm._draft_key = key
        return
    # A chain draft runs one token per pass; a tree draft runs a level of nodes. The draft passes leave
    # attention and positions as they are, so check_tree_verify's proof for decode covers it.
    cfg = plan.draft_config(device, sm.spec.dtype)
    _add_program(sm, "draft", draft_pipeline(cfg), cfg, dynamic_q=plan.tree_draft)
    sm._draft_key = key


def _build_del_programs(sm: SpecModel, plan, device) -> None:
    """DEL (runtime/dynamic_exit.py): one early-exit draft program per candidate exit, a one-token step each,
    and the verify program that also returns each exit's tokens (passes/exit_predictions.py)."""
    vocab_ids = plan.draft_config(device).vocab_ids
    for k in plan.del_exits:
        cfg = DraftConfig(exit_layer=k, vocab_ids=vocab_ids)
        _add_program(sm, draft_program_name(k), draft_pipeline(cfg), cfg, dynamic_q=False)
    cfg = DraftConfig(exits=tuple(plan.del_exits), vocab_ids=vocab_ids)
    _add_program(sm, VERIFY_EXITS, PIPELINES[VERIFY_EXITS], cfg, dynamic_q=True)


def _add_program(sm: SpecModel, name: str, pipeline: tuple, cfg: DraftConfig, *, dynamic_q: bool) -> None:
    """Run ``pipeline`` on the captured graph and lower the result as ``sm.programs[name]``."""
    spec, device = sm.captured.spec, next(sm.model.parameters()).device
    gm = run_passes(sm.captured.gm, pipeline, sm.captured.structure, cfg)
    sm.summaries[name] = summary(gm)
    sm.programs[name] = lower(
        gm,
        sm.backend,
        name=name,
        example_args=example_inputs(spec, q=2 if dynamic_q else 1, device=device),
        dynamic_shapes=program_dynamic_shapes(spec, dynamic_q=dynamic_q, rewritten=True),
    )


def del_costs(captured: CapturedGraph, plan) -> list[float]:
    """A draft token's cost at each of ``plan.del_exits`` relative to DEL's verify pass: the parameters each
    reads (decoding one sequence is bound by memory bandwidth), over those of the verify pass, which reads the
    whole model and one more head (or ``plan.vocab_ids``' rows of it) per exit."""
    drafts, verify = del_param_costs(captured, plan.del_exits, plan.vocab_ids)
    return [c / verify for c in drafts]


def del_param_costs(captured: CapturedGraph, exits, vocab_ids=None) -> tuple[list[float], float]:
    """(an early-exit draft token's parameters at each exit, DEL's verify pass's), as fractions of a plain pass."""
    structure = captured.structure
    per_layer = [
        sum(p.numel() for p in captured.gm.get_submodule(f"{structure.layers_path}.{i}").parameters())
        for i in range(len(structure.layers))
    ]
    hidden = structure.lm_head.args[0].meta["val"].shape[-1]
    vocab = structure.lm_head.meta["val"].shape[-1]
    head = (vocab if vocab_ids is None else len(vocab_ids)) * hidden
    full = sum(per_layer) + vocab * hidden
    return [(sum(per_layer[: k + 1]) + head) / full for k in exits], 1 + len(exits) * head / full


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
