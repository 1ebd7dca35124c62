"""The compiled programs of a SpecModel: plain decoding (prefill, decode) and the draft programs of a plan.

What ``optimize()`` and calibration both build, in a module of their own so that neither imports the other.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

import torch
from torch import nn

from specpass.capture import CapturedGraph, capture
from specpass.errors import SpecPassError
from specpass.graph_text import summary
from specpass.kernels import build_in_background, choice, loaded_isa
from specpass.kernels.choice import describe_choice, describe_order
from specpass.lower import cancel, cpu_target, lower, resolve
from specpass.passes import PIPELINES, DraftConfig, draft_pipeline, run_passes, with_options
from specpass.passes.exact_lowbit import pack, packing
from specpass.program_export import example_inputs, program_dynamic_shapes
from specpass.progress import progress_bar
from specpass.runtime.cuda_graphs import waits_on_host
from specpass.runtime.dynamic_exit import VERIFY_EXITS, draft_program_name
from specpass.runtime.model import NO_TREES_WITH_STATE, CompiledLM
from specpass.runtime.pieces import PiecewiseProgram

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
        self.exact_lowbit: bool | str = True  # optimize(..., exact_lowbit=True | "always" | False)
        self.lowbit: dict[str, dict] = {}  # weight -> what exact_lowbit matched (format, blocks, bytes)
        self.lowbit_choices: dict[str, dict] = {}  # kind of call -> kernel and fp32 times here, and the choice
        self.order_choices: dict[str, dict] = {}  # shape of fp32 weight -> its two operand orders' times here
        self.lowbit_calls: dict[str, list] = {}  # program -> its low-bit calls (parameters, block, bits, shapes)
        self.lowbit_params: dict[str, object] = {}  # parameter name of a low-bit call -> its tensor
        self.packs: dict = {}  # the blocks exact_lowbit recovered, shared by this model's programs (packing)
        self.isa: str | None = None  # the x86-64 level of its CPU programs (lower/cpu_target.py)


def compile_plain(
    model: nn.Module,
    *,
    backend: str,
    max_cache_len: int | None,
    progress: bool,
    cuda_graphs: bool | None = None,
    exact_lowbit: bool | str = True,
    isa: str | None = None,
) -> SpecModel:
    """Capture ``model`` and lower its plain-decoding programs (prefill, and decode for any number of tokens)."""
    if exact_lowbit not in (True, False, "always"):
        raise SpecPassError(f"exact_lowbit must be True, False or 'always', got {exact_lowbit!r}")
    device = next(model.parameters()).device
    if device.type == "cpu":
        isa = cpu_target.check_level(isa) if isa is not None else cpu_target.default_level()
    elif isa is not None:
        raise SpecPassError(f"isa={isa!r} is for a model on the CPU; this one is on {device}: leave isa out")
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    packs: dict = {}
    with packing(packs):
        if exact_lowbit and _on_a_grid(model):
            build_in_background()  # the compiler works while the model is captured
    captured = capture(model, max_cache_len=max_cache_len)
    if cuda_graphs and device.type != "cuda":
        raise SpecPassError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}")
    sm = SpecModel(model, captured, {}, backend, 0.0)
    sm.exact_lowbit, sm.packs, sm.isa = exact_lowbit, packs, isa
    with progress_bar(total=2, desc=f"specpass: compiling ({backend})", unit="program", enabled=progress) as bar:
        # decode takes any number of tokens: one in plain decoding, the verified chain in speculation. Prefill
        # compiles in a child process meanwhile (lower/inductor.py), where the backend can. Decode's passes run
        # before it starts: a time measured beside a compile is noise (on a 2-core Xeon Gemma's o_proj took 142 ms
        # with the kernel and 135 ms in fp32 beside one, 3.0 and 7.2 ms alone), and they time the few-token choices.
        decode = rewrite_first(sm, PIPELINES["decode"])
        _add_program(sm, "prefill", PIPELINES["prefill"], None, dynamic_q=True, background=True)
        try:
            _add_program(sm, "decode", PIPELINES["decode"], None, dynamic_q=True, rewritten=decode)
            bar.update()
            sm.programs["prefill"] = resolve(sm.programs["prefill"])
        finally:
            cancel(sm.programs["prefill"])  # still compiling only if this failed or was interrupted
        bar.update()
    sm.compile_s = time.perf_counter() - t0
    if sm.lowbit:
        packed = sum(v["bytes"] for v in sm.lowbit.values())
        log.info(
            "exact_lowbit: %d weight matrices stored as blocks (%s), %.1f MB; kernels %s",
            len(sm.lowbit),
            ", ".join(f"{n} {f}" for f, n in Counter(v["format"] for v in sm.lowbit.values()).items()),
            packed / 1e6,
            loaded_isa(),
        )
    for what, result in sm.lowbit_choices.items():
        if not result["lowbit"]:
            log.info("exact_lowbit: %s stays fp32 on this CPU (%s)", what, describe_choice(result))
    for what, result in choice.timed_orders(sm.order_choices).items():
        log.info("fp32 products %s: %s", what, describe_order(result))
    if cuda_graphs is not None:
        sm.cuda_graphs = cuda_graphs
    return sm


def _on_a_grid(model: nn.Module) -> bool:
    """Whether some fp32 CPU matrix of ``model`` lies on a block grid (a GGUF model's): exact_lowbit will need the
    kernels. The packing found is kept for the pass (in the ``packing`` cache in effect)."""
    return any(
        pack(p) is not None
        for p in model.parameters()
        if p.dim() == 2 and p.dtype == torch.float32 and p.device.type == "cpu"
    )


def build_program(
    captured: CapturedGraph,
    name: str,
    pipeline: tuple,
    backend: str,
    cfg: DraftConfig | None = None,
    *,
    dynamic_q: bool,
    sm: SpecModel | None = None,
    background: bool = False,
    rewritten: torch.fx.GraphModule | None = None,
) -> tuple:
    """Run ``pipeline`` on the captured graph and lower the result: (the program, its graph summary).

    ``dynamic_q``: the program takes any number of tokens per call, else one. A model captured per query
    length (recurrent state, see capture.py) gets a PiecewiseProgram whose pieces are built when first needed.
    ``sm``: the SpecModel the program is for; it collects what exact_lowbit matched, chose and called.
    ``background``: the program may come back still compiling in a child process (lower.resolve waits for it).
    ``rewritten``: ``rewrite_first``'s result for this pipeline, so that its passes do not run again.
    """
    spec = captured.spec
    device = next(captured.gm.parameters()).device

    def build(graph: CapturedGraph, q: int | None):
        gm = rewritten if rewritten is not None and q in (None, 1) else _run_pipeline(graph, pipeline, cfg, sm)
        if sm is not None:
            found = gm.meta["specpass"]
            sm.lowbit.update(found.get("exact_lowbit", {}))
            sm.lowbit_choices.update(found.get("lowbit_choices", {}))
            sm.order_choices.update(found.get("operand_order", {}))
            sm.lowbit_calls[name if q is None else f"{name}_q{q}"] = found.get("lowbit_calls", [])
            for call in found.get("lowbit_calls", []):
                sm.lowbit_params.update((p, getattr(gm, p)) for p in call["params"])
        program = lower(
            gm,
            backend,
            name=name if q is None else f"{name}_q{q}",
            example_args=example_inputs(spec, q=q or (2 if dynamic_q else 1), device=device),
            dynamic_shapes=program_dynamic_shapes(spec, dynamic_q=dynamic_q and q is None, rewritten=True),
            pipeline=pipeline,
            few_tokens=name != "prefill",
            background=background and q is None,
            isa=sm.isa if sm is not None else None,
        )
        if waits_on_host(gm):
            program.waits_on_host = True  # CompiledLM runs it without CUDA graphs
        return program, summary(gm)

    if captured.query_len is None:
        return build(captured, None)
    one, one_summary = build(captured.at(1), 1)
    pieces = PiecewiseProgram(
        lambda q: build(captured.at(q), q)[0], len(spec.mask_kinds), captured.max_query_len if dynamic_q else 1
    )
    pieces.programs[1] = one
    pieces.waits_on_host = getattr(one, "waits_on_host", False)
    return pieces, one_summary


def _run_pipeline(graph: CapturedGraph, pipeline: tuple, cfg: DraftConfig | None, sm: SpecModel | None):
    """``pipeline``'s passes on ``graph``, with ``sm``'s choice mode and packed blocks."""
    mode = "always" if sm is not None and sm.exact_lowbit == "always" else None
    with choice.use_mode(mode), packing(sm.packs if sm is not None else {}):
        return run_passes(graph.gm, pipeline, graph.structure, cfg)


def rewrite_first(sm: SpecModel, pipeline: tuple) -> torch.fx.GraphModule:
    """``pipeline``'s passes on the captured graph (its one-token piece where it is captured per query length),
    run now: what they time on this CPU (kernels/choice.py) is timed with nothing else running."""
    graph = sm.captured if sm.captured.query_len is None else sm.captured.at(1)
    return _run_pipeline(graph, with_options(pipeline, exact_lowbit=sm.exact_lowbit), None, sm)


def check_tree_verify(sm: SpecModel) -> None:
    """Raise SpecPassError unless the decode program can verify draft trees (passes/tree_verify.py)."""
    if sm.spec.has_state:
        raise SpecPassError(NO_TREES_WITH_STATE)
    if "verify" not in sm.summaries:
        pipeline = with_options(PIPELINES["verify"], exact_lowbit=sm.exact_lowbit)
        with choice.use_mode("always" if sm.exact_lowbit == "always" else None), packing(sm.packs):
            gm = run_passes(sm.captured.gm, pipeline, sm.captured.structure)
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
    for name, (pipeline, cfg, dynamic_q) in draft_programs(plan, device, sm.spec.dtype).items():
        _add_program(sm, name, pipeline, cfg, dynamic_q=dynamic_q)
    sm._draft_key = key


def speculate_with(sm: SpecModel, plan) -> None:
    """Compile ``plan``'s drafts onto ``sm``'s captured graph and speculate with them from now on; the prefill and
    decode programs stay, and a previous plan's drafts are replaced (what calibration does between candidates)."""
    plan.check(sm.model)
    if not plan.drafts:
        raise SpecPassError(f"speculate=True but the plan has no draft ({plan.reason}); pass speculate='auto'")
    if plan.tree_budget:
        check_tree_verify(sm)
    if plan.del_exits and not plan.del_costs:
        plan = dataclasses.replace(plan, del_costs=del_costs(sm.captured, plan))
    build_draft_programs(sm, plan)
    sm.plan = dataclasses.replace(plan, speculate=True)


def start_draft_program(sm: SpecModel, plan):
    """Start compiling ``plan``'s draft program in a child process, into the program cache, where
    ``build_draft_programs`` then finds it: the caller compiles another draft meanwhile. Returns what to
    ``resolve`` before timing anything, or None where nothing was started (no draft program, DEL, another
    backend, no program cache, a model captured per query length)."""
    from specpass.lower import program_cache

    if not plan.has_draft or plan.del_exits or sm.backend != "inductor" or not program_cache.enabled():
        return None
    if sm.captured.query_len is not None:
        return None
    pipeline, cfg, dynamic_q = draft_programs(plan, next(sm.model.parameters()).device, sm.spec.dtype)["draft"]
    pipeline = with_options(pipeline, exact_lowbit=sm.exact_lowbit)
    program, _ = build_program(
        sm.captured, "draft", pipeline, sm.backend, cfg, dynamic_q=dynamic_q, sm=sm, background=True
    )
    return program


def draft_programs(plan, device=None, dtype=None) -> dict[str, tuple[tuple, DraftConfig, bool]]:
    """The draft programs ``plan`` needs: name -> (passes, their DraftConfig, whether the program takes any
    number of tokens per call); none for a plan without one (lookup only).

    A chain draft runs one token per pass; a tree draft runs a level of nodes: the draft passes leave attention
    and positions as they are, so check_tree_verify's proof for decode covers it. DEL (runtime/dynamic_exit.py):
    one early-exit draft program per candidate exit, a one-token step each, and the verify program that also
    returns each exit's tokens (passes/exit_predictions.py).
    """
    if not plan.has_draft:
        return {}
    if not plan.del_exits:
        cfg = plan.draft_config(device, dtype)
        return {"draft": (draft_pipeline(cfg), cfg, plan.tree_draft)}
    vocab_ids = plan.draft_config(device).vocab_ids
    programs = {}
    for k in plan.del_exits:
        cfg = DraftConfig(exit_layer=k, vocab_ids=vocab_ids)
        programs[draft_program_name(k)] = (draft_pipeline(cfg), cfg, False)
    cfg = DraftConfig(exits=tuple(plan.del_exits), vocab_ids=vocab_ids)
    programs[VERIFY_EXITS] = (PIPELINES[VERIFY_EXITS], cfg, True)
    return programs


def _add_program(
    sm: SpecModel,
    name: str,
    pipeline: tuple,
    cfg: DraftConfig | None,
    *,
    dynamic_q: bool,
    background: bool = False,
    rewritten: torch.fx.GraphModule | None = None,
) -> None:
    """Run ``pipeline`` on the captured graph (or take ``rewritten``) and lower the result as
    ``sm.programs[name]``."""
    pipeline = with_options(pipeline, exact_lowbit=sm.exact_lowbit)
    sm.programs[name], sm.summaries[name] = build_program(
        sm.captured,
        name,
        pipeline,
        sm.backend,
        cfg,
        dynamic_q=dynamic_q,
        sm=sm,
        background=background,
        rewritten=rewritten,
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
