"""``specpass bench``: specpass against HF baselines on Spec-Bench prompts, side by side in one process.

Protocol (Spec-Bench's): greedy decoding, batch 1, the first turn of each question in the model's chat template,
a stratified sample of the questions (round-robin over the categories in file order). Every method generates
every prompt, and the methods alternate per prompt, in an order rotated from one prompt to the next, so that
a slow patch of a shared machine hits all of them alike. Each method stops at eos on its own; a lossless
method produces HF eager's tokens anyway, and the bench checks that it does: a difference that is not a
near-tie of HF's own top-2 logits fails the run (exit code 1).

Methods live in ``METHODS``: a name, and ``setup(model, tokenizer, cfg) -> Runner`` where the runner's
``generate(input_ids) -> output ids`` behaves like ``model.generate`` (prompt + new ids). A new peer is one
more entry there; the loop does not change. A setup that raises ``MethodUnavailable`` (a peer package that is
not installed, a model it does not support) is reported as skipped, and the other methods run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import logging
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specpass.errors import SpecPassError
from specpass.lower import BACKENDS

log = logging.getLogger("specpass.bench")

REFERENCE = "hf_eager"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEAR_TIE = 1e-3  # HF's top-2 logits closer than this: either token is a correct greedy choice up to rounding
#: bf16 / fp16 models: HF's top-2 logits fewer than this many units in the last place (of the model's dtype, at
#: the top logit) apart also tie; bf16 rounds a logit near 4 to steps of 0.03, so a reordered sum moves it a step
NEAR_TIE_ULPS = 2
_DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "spec_bench" / "dev.jsonl"
# Untimed warm-up prompts, of different lengths so that a compiled prefill meets two shapes before timing.
_WARM_UP_MESSAGES = (
    "Say hello.",
    "Write one sentence about the sea, then one sentence about the mountains, then one about the sky.",
)
HF_PROMPT_LOOKUP_TOKENS = 10  # HF's documented suggestion for prompt_lookup_num_tokens
EARLY_EXIT_FRACTIONS = (0.25, 0.5, 0.75)  # hf_early_exit tries these fractions of the layers, keeps the fastest
EARLY_EXIT_PROBE_TOKENS = 32  # new tokens of each timed probe generation while choosing the exit layer
ECONOMIZE_SKIP_FRACTION = 0.4  # economize_layer_skip skips this share of the layers (its README's 10 of 24)

Generate = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What a method's setup may need; built once from the command line."""

    max_new_tokens: int
    max_cache_len: int
    backend: str = "inductor"  # specpass's lowering backend
    device: torch.device = torch.device("cpu")
    plan: object = None  # a SpecPlan for the specpass methods (None: the cached or calibrated one)
    methods: tuple[str, ...] = ()  # the methods of the run
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    #: what methods of one run share: "spec_model", the one specpass.optimize() that specpass and
    #: specpass_plain both generate with
    shared: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def hf_generate_kwargs(self) -> dict:
        """Plain greedy decoding for ``model.generate``, stopping where every method stops."""
        return {
            "do_sample": False,
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


class MethodUnavailable(SpecPassError):
    """A method's setup cannot run here (a package that is not installed, a model it does not support).

    The bench reports the method as skipped, with this message as the reason, and runs the others.
    """


@dataclasses.dataclass
class Runner:
    """A set-up method. ``warm_up_runs`` untimed generations precede the timed ones (prompts of different lengths).

    ``tau``, if given, is called after each timed generation: the tokens per verify step of the generation that
    just ran (None where it does not apply). ``note`` is a choice the setup made (e.g. a tuned parameter); the
    report shows it.
    """

    generate: Generate
    warm_up_runs: int = 1
    tau: Callable[[], float | None] | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    setup: Callable[..., Runner]  # (model, tokenizer, cfg: BenchConfig) -> Runner


def _setup_hf_eager(model, tokenizer, cfg: BenchConfig) -> Runner:
    kwargs = cfg.hf_generate_kwargs()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return Runner(run)


def _setup_hf_static_compile(model, tokenizer, cfg: BenchConfig) -> Runner:
    """HF's documented recipe: a static cache and ``model.forward = torch.compile(model.forward)``.

    The recipe replaces ``forward`` on the model, which would turn the shared model's eager baseline into a
    compiled one; a shallow copy shares every parameter and submodule but holds its own ``forward`` and
    generation config. The cache is sized once (``max_cache_len``) for all prompts so that its shape, and with
    it the compiled graphs, never change. The prefill graph is compiled static for the first prompt length and
    recompiled with a symbolic length at the second, hence two warm-up runs with different prompt lengths.
    """
    compiled = copy.copy(model)
    config = copy.deepcopy(model.generation_config)
    config.cache_implementation = "static"
    config.max_cache_len = cfg.max_cache_len
    config.disable_compile = True  # we compile forward ourselves; generate's auto-compile would wrap it again
    compiled.generation_config = config
    mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None  # CUDA graphs: GPU only
    compiled.forward = torch.compile(compiled.forward, mode=mode, fullgraph=True)
    kwargs = cfg.hf_generate_kwargs()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return Runner(run, warm_up_runs=2)


def _setup_hf_prompt_lookup(model, tokenizer, cfg: BenchConfig) -> Runner:
    """HF's prompt lookup decoding: drafts copied from n-gram matches in the context, verified by the model."""
    kwargs = {**cfg.hf_generate_kwargs(), "prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS}

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return Runner(run, note=f"prompt_lookup_num_tokens={HF_PROMPT_LOOKUP_TOKENS}")


def early_exit_candidates(num_layers: int) -> list[int]:
    """The exit layers hf_early_exit tries: ``EARLY_EXIT_FRACTIONS`` of the layers, rounded, in [1, layers - 1]."""
    top = max(1, num_layers - 1)
    return sorted({min(top, max(1, round(f * num_layers))) for f in EARLY_EXIT_FRACTIONS})


def _setup_hf_early_exit(model, tokenizer, cfg: BenchConfig) -> Runner:
    """HF's self-speculative early exit (``assistant_early_exit=k``: the first k layers draft, the model verifies).

    k is the fastest of a few (``early_exit_candidates``) on a short untimed probe generation of a fixed warm-up
    prompt, never a Spec-Bench one; the choice and the probe's speeds are logged and end up in the report's note.
    """
    from specpass.models import chat_ids

    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers or num_layers < 2:
        raise MethodUnavailable(f"early exit needs a model with num_hidden_layers >= 2, got {num_layers}")
    base = cfg.hf_generate_kwargs()
    device = next(model.parameters()).device
    probe = chat_ids(tokenizer, _WARM_UP_MESSAGES[1]).to(device)
    probe_kwargs = {**base, "max_new_tokens": min(cfg.max_new_tokens, EARLY_EXIT_PROBE_TOKENS)}

    def generate(ids: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), assistant_early_exit=k, **kwargs)

    candidates = early_exit_candidates(num_layers)
    speeds: dict[int, float] = {}
    for k in candidates if len(candidates) > 1 else ():
        generate(probe, k, **probe_kwargs)  # untimed: first-call effects
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = generate(probe, k, **probe_kwargs)
            best = min(best, time.perf_counter() - t0)
        speeds[k] = max(1, out.shape[1] - probe.shape[1]) / best
    if speeds:
        chosen = max(speeds, key=speeds.__getitem__)
        why = "the fastest on a warm-up probe (" + ", ".join(f"k={k}: {v:.1f} tok/s" for k, v in speeds.items()) + ")"
    else:
        chosen, why = candidates[0], "the only candidate"
    log.info("hf_early_exit: assistant_early_exit=%d of %d layers, %s", chosen, num_layers, why)

    def run(ids: torch.Tensor) -> torch.Tensor:
        return generate(ids, chosen, **base)

    return Runner(run, note=f"assistant_early_exit={chosen} of {num_layers} layers, {why}")


def _import_peer(module: str):
    """A peer package, or MethodUnavailable saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MethodUnavailable(f"{module} is not installed ({e}); pip install {module}") from e


def _eos_list(eos: int | list[int] | None) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _setup_economize_layer_skip(model, tokenizer, cfg: BenchConfig) -> Runner:
    """economize's training-free self-speculative layer skipping (``economize.apply(model, LayerSkipConfig)``).

    Drafts run the model minus ``ECONOMIZE_SKIP_FRACTION`` of its layers, chosen by economize's default greedy
    search (KL) on the warm-up prompts; each cycle of economize's default length 4 is verified by the full model.
    Greedy decoding through ``EfficientModel.decode`` (its eager decoding loop), stopping at eos.
    """
    from specpass.models import chat_ids

    economize = _import_peer("economize")
    from economize.techniques.layer_skip import LayerSkipConfig

    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers or num_layers < 2:
        raise MethodUnavailable(f"layer skipping needs a model with num_hidden_layers >= 2, got {num_layers}")
    num_skip = min(max(1, round(ECONOMIZE_SKIP_FRACTION * num_layers)), num_layers - 1)
    keep = 1 if num_skip <= num_layers - 2 else 0  # keep the first and last layers where the model is deep enough
    device = next(model.parameters()).device
    calibration = [chat_ids(tokenizer, m).to(device) for m in _WARM_UP_MESSAGES]
    config = LayerSkipConfig(num_skip=num_skip, keep_first=keep, keep_last=keep)
    try:
        spec = economize.apply(model, config, calibration=calibration)
    except economize.UnsupportedModelError as e:  # an architecture economize has no adapter for
        raise MethodUnavailable(f"economize does not support this model: {e}") from e
    skipped = list(spec.techniques["layer_skip"].skip_layers)
    cycle = spec.decoding.cycle_length
    log.info("economize_layer_skip: skips layers %s of %d, cycle_length %d", skipped, num_layers, cycle)
    stop = _eos_list(cfg.eos_token_id) or None
    last: dict = {}

    def run(ids: torch.Tensor) -> torch.Tensor:
        result = spec.decode(ids, cfg.max_new_tokens, stop=stop)
        last["result"] = result
        return torch.cat([ids, result.tokens.to(ids.device).reshape(1, -1)], dim=1)

    def tau() -> float | None:
        result = last.get("result")
        return 1.0 + result.mean_accepted if result is not None and result.acceptance else None

    note = f"economize {economize.__version__}: drafts skip layers {skipped} of {num_layers}, cycle_length {cycle}"
    return Runner(run, tau=tau, note=note)


def _setup_flashspec_lookup(model, tokenizer, cfg: BenchConfig) -> Runner:
    """flashspec's engine with its prompt-lookup drafter (``NgramDrafter``), the one mode without a second model.

    flashspec's defaults otherwise (draft length ``SamplingConfig.gamma`` 4, ``compile="auto"``: CUDA graphs on
    a GPU with Triton, eager elsewhere), greedy (``temperature=0``).
    """
    flashspec = _import_peer("flashspec")
    from flashspec.engine import NgramDrafter, TargetModel

    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    dtype_kwarg = {"dtype": dtype} if dtype in ("float32", "bfloat16", "float16") else {}
    config = flashspec.FlashSpecConfig(
        device=str(param.device), sampling=flashspec.SamplingConfig(temperature=0.0), **dtype_kwarg
    )
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    target = TargetModel(name, param.device, param.dtype, model=model)
    engine = flashspec.SpeculativeEngine(config, [NgramDrafter()], target)
    eos = _eos_list(cfg.eos_token_id)
    last: dict = {}

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            result = engine.generate(ids, max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos)
        last["result"] = result
        new = result.output_ids[:, : result.n_tokens_generated].to(ids.device)
        return torch.cat([ids, new], dim=1)

    def tau() -> float | None:
        steps = getattr(last.get("result"), "arm_steps", ())
        return sum(s.emitted for s in steps) / len(steps) if steps else None

    note = (
        f"flashspec {flashspec.__version__}: NgramDrafter, gamma {config.sampling.gamma}, "
        f"strategy {engine.drafter_strategy}, compiled {engine.compiled}"
    )
    return Runner(run, tau=tau, note=note)


def _setup_specpass_plain(model, tokenizer, cfg: BenchConfig) -> Runner:
    return _specpass_runner(model, tokenizer, cfg, speculate=False)


def _setup_specpass(model, tokenizer, cfg: BenchConfig) -> Runner:
    return _specpass_runner(model, tokenizer, cfg, speculate=None)


def _specpass_runner(model, tokenizer, cfg: BenchConfig, *, speculate: bool | None) -> Runner:
    """``specpass.optimize(model)`` generating as its plan says (None) or plainly (False); ``tau`` reads the last
    generation's stats."""
    import specpass

    spec_model = cfg.shared.get("spec_model")
    if spec_model is None:
        spec_model = specpass.optimize(
            model,
            # specpass_plain alone needs no plan: no calibration
            speculate="auto" if "specpass" in cfg.methods else False,
            tokenizer=tokenizer,
            plan=cfg.plan,
            backend=cfg.backend,
            max_cache_len=cfg.max_cache_len,
        )
        log.info("specpass.optimize(backend=%s) took %.1f s", cfg.backend, spec_model.compile_s)
        cfg.shared["spec_model"] = spec_model

    def run(ids: torch.Tensor) -> torch.Tensor:
        return spec_model.generate(
            ids,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            eos_token_id=cfg.eos_token_id,
            speculate=speculate,
        )

    def tau() -> float | None:
        value = getattr(spec_model.last_stats, "tau", None)
        return None if value is None else float(value)

    plan = spec_model.plan
    if speculate is False or plan is None:
        return Runner(run, tau=tau, note="the same compiled programs as specpass, one token per step")
    return Runner(run, tau=tau, note=f"plan: {plan.describe()}; {plan.reason}")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("hf_eager", "HF model.generate, greedy (the reference)", _setup_hf_eager),
        Method(
            "hf_static_compile",
            "HF model.generate with a static cache and torch.compile(model.forward)",
            _setup_hf_static_compile,
        ),
        Method(
            "hf_prompt_lookup",
            f"HF model.generate(prompt_lookup_num_tokens={HF_PROMPT_LOOKUP_TOKENS}) (prompt lookup decoding)",
            _setup_hf_prompt_lookup,
        ),
        Method(
            "hf_early_exit",
            "HF model.generate(assistant_early_exit=k) (self-speculative early exit), k the fastest of a few",
            _setup_hf_early_exit,
        ),
        Method(
            "economize_layer_skip",
            "economize (PyPI) training-free self-speculative layer skipping; skipped if not installed",
            _setup_economize_layer_skip,
        ),
        Method(
            "flashspec_lookup",
            "flashspec (PyPI) speculative engine with its prompt-lookup drafter; skipped if not installed",
            _setup_flashspec_lookup,
        ),
        Method(
            "specpass_plain",
            "specpass.optimize(model).generate(speculate=False): its programs, one token per step",
            _setup_specpass_plain,
        ),
        Method("specpass", "specpass.optimize(model) (its default decoding)", _setup_specpass),
    )
}
DEFAULT_METHODS = tuple(METHODS)  # all of them; peers that are not installed are reported as skipped


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Benchmark specpass against Hugging Face baselines on Spec-Bench prompts: greedy, batch 1, methods "
        "alternating per prompt in one process. Reports tokens/s, the ratio to HF eager, compile and warm-up "
        "time, and whether every method's output equals HF eager's. Exit code 1 if one does not "
        "(beyond near-ties of HF's own logits)."
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), a local model "
        "directory, or a Hugging Face Hub id (default: %(default)s)",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="PATH",
        help="Spec-Bench question file (JSONL: question_id, category, turns); default: the "
        "repository's shared/data/spec_bench/dev.jsonl",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=12,
        metavar="N",
        help="questions to run, sampled round-robin over categories (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="inductor",
        choices=BACKENDS,
        help="specpass lowering backend (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, metavar="N", help="torch.set_num_threads (default: %(default)s)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where every method runs: cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="the model's dtype for every method (default: as loaded, float32 for the bundled model)",
    )
    parser.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        metavar="N",
        help="KV cache size of the static-cache methods, the same for every prompt "
        "(default: longest prompt + max new tokens, rounded up to 64)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        metavar="PATH",
        help="a SpecPlan JSON file for specpass (default: the cached plan, calibrating the model if there is none)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full results as JSON")
    parser.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="write the tables, command and machine as a Markdown section (for docs/benchmarks.md)",
    )


def run_bench(args: argparse.Namespace, *, model=None, tokenizer=None, methods: dict[str, Method] | None = None) -> int:
    """Run the benchmark that ``args`` describe; ``model``/``tokenizer``/``methods`` may be injected (tests)."""
    from specpass.models import chat_ids

    registry = METHODS if methods is None else methods
    names = _parse_methods(args.methods, registry)
    if args.num_prompts < 1:
        raise SpecPassError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_new_tokens < 1:
        raise SpecPassError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads < 1:
        raise SpecPassError(f"--threads must be >= 1, got {args.threads}")
    device = bench_device(args.device)
    prompts_path = resolve_prompts(args.prompts)
    questions = stratified_sample(load_questions(prompts_path), args.num_prompts)
    torch.set_num_threads(args.threads)

    if model is None:
        from specpass import models

        model, tokenizer = models.load(args.model)
    elif tokenizer is None:
        raise SpecPassError("run_bench: a model was given without its tokenizer")
    model = model.to(device=device, dtype=DTYPES[args.dtype] if args.dtype else None).eval()

    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template; using the raw question text as the prompt")
    prompts = [chat_ids(tokenizer, q["turns"][0]).to(device) for q in questions]
    warm_ups = [chat_ids(tokenizer, m).to(device) for m in _WARM_UP_MESSAGES]
    longest = max(p.shape[1] for p in prompts + warm_ups)
    max_cache_len = args.max_cache_len or _default_cache_len(model, longest + args.max_new_tokens)
    if longest + args.max_new_tokens > max_cache_len:
        raise SpecPassError(
            f"--max-cache-len {max_cache_len} is too small: the longest prompt has {longest} tokens, plus "
            f"--max-new-tokens {args.max_new_tokens}; pass at least {longest + args.max_new_tokens}"
        )
    gen = model.generation_config
    cfg = BenchConfig(
        max_new_tokens=args.max_new_tokens,
        max_cache_len=max_cache_len,
        backend=args.backend,
        device=device,
        plan=_load_plan(args.plan),
        methods=tuple(names),
        eos_token_id=gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id,
    )
    log.info("%d prompts (%s), %d methods, max_cache_len %d", len(prompts), prompts_path, len(names), max_cache_len)

    runners: dict[str, Runner] = {}
    setup_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        log.info("setting up %s", name)
        t0 = time.perf_counter()
        try:
            runners[name] = registry[name].setup(model, tokenizer, cfg)
        except MethodUnavailable as e:
            if name == REFERENCE:
                raise
            log.warning("skipping %s: %s", name, e)
            skipped[name] = str(e)
            continue
        setup_s[name] = time.perf_counter() - t0
    names = [n for n in names if n not in skipped]
    results = _Results(names)
    results.skipped = skipped
    results.setup_s.update(setup_s)
    results.notes = {n: runners[n].note for n in names if runners[n].note}
    for name in names:
        runner = runners[name]
        t0 = time.perf_counter()
        for i in range(runner.warm_up_runs):
            runner.generate(warm_ups[i % len(warm_ups)])
        results.warm_up_s[name] = time.perf_counter() - t0
        log.info("%s: setup %.1f s, warm-up %.1f s", name, results.setup_s[name], results.warm_up_s[name])

    with tqdm(total=len(prompts) * len(names), desc="bench", unit="gen", leave=False) as bar:
        for i, (q, ids) in enumerate(zip(questions, prompts, strict=True)):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                bar.set_postfix_str(f"{q['category']} {name}")
                graphs = _graphs_compiled()
                _synchronize(device)
                t0 = time.perf_counter()
                out = runners[name].generate(ids)
                _synchronize(device)  # a method may return before its last kernels have run
                seconds = time.perf_counter() - t0
                compiled = _graphs_compiled() - graphs
                if compiled:
                    log.warning("%s compiled %d graph(s) during timed prompt %s", name, compiled, q["question_id"])
                tau = runners[name].tau() if runners[name].tau is not None else None
                results.record(i, name, out, seconds, compiled, tau)
                bar.update()

    report = _report(args, results, questions, prompts, model, tokenizer, cfg, prompts_path)
    print(report["text"])
    if args.json:
        _write(args.json, json.dumps(report["json"], indent=2) + "\n")
    if args.markdown:
        _write(args.markdown, report["markdown"])
    return report["json"]["exit_code"]


def bench_device(spec: str) -> torch.device:
    """``--device``, checked: a CUDA device needs a GPU that torch sees."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise SpecPassError(f"--device {spec!r} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecPassError(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SpecPassError(f"--device {spec}: specpass runs on cpu or cuda")
    return device


def _load_plan(path: str | None):
    if path is None:
        return None
    from specpass.tune.plan import SpecPlan

    return SpecPlan.load(path)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_methods(spec: str, registry: dict[str, Method]) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SpecPassError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    if len(set(names)) != len(names):
        raise SpecPassError(f"--methods lists a method twice: {spec}")
    if REFERENCE not in names:
        log.warning("adding %s: it is the reference every method is compared with", REFERENCE)
        names.insert(0, REFERENCE)
    return names


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------
def resolve_prompts(path: str | os.PathLike[str] | None) -> Path:
    """``--prompts``, or the repository checkout's Spec-Bench dev split."""
    if path is None:
        if not _DEFAULT_PROMPTS.is_file():
            raise SpecPassError(
                f"Spec-Bench prompts not found at {_DEFAULT_PROMPTS} (the default outside a specpass repository "
                "checkout does not exist); pass --prompts PATH, a Spec-Bench question.jsonl"
            )
        return _DEFAULT_PROMPTS
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecPassError(f"--prompts {path}: no such file")
    return p


def load_questions(path: Path) -> list[dict]:
    """Spec-Bench questions: one JSON object a line with question_id, category and a non-empty turns list."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecPassError(f"{path}:{n}: not JSON: {e}") from e
            if not (
                isinstance(q, dict)
                and "question_id" in q
                and isinstance(q.get("category"), str)
                and isinstance(q.get("turns"), list)
                and q["turns"]
                and isinstance(q["turns"][0], str)
            ):
                raise SpecPassError(f"{path}:{n}: expected a question_id, a category and a list of turns")
            questions.append(q)
    if not questions:
        raise SpecPassError(f"{path} holds no questions")
    return questions


def stratified_sample(questions: Sequence[dict], n: int) -> list[dict]:
    """The first n of a round-robin over categories (in order of first appearance), questions in file order."""
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    if n > len(questions):
        log.warning("only %d questions available; running all of them", len(questions))
    sample: list[dict] = []
    depth = 0
    while len(sample) < min(n, len(questions)):
        for qs in by_category.values():
            if depth < len(qs) and len(sample) < n:
                sample.append(qs[depth])
        depth += 1
    return sample


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    out: torch.Tensor
    seconds: float
    compiled: int
    tau: float | None = None


class _Results:
    def __init__(self, names: list[str]):
        self.names = names
        self.setup_s: dict[str, float] = {}
        self.warm_up_s: dict[str, float] = {}
        self.runs: list[dict[str, _Run]] = []
        self.skipped: dict[str, str] = {}  # method -> why its setup could not run
        self.notes: dict[str, str] = {}  # method -> its runner's note

    def record(
        self, i: int, name: str, out: torch.Tensor, seconds: float, compiled: int, tau: float | None = None
    ) -> None:
        while len(self.runs) <= i:
            self.runs.append({})
        self.runs[i][name] = _Run(out.detach().cpu().reshape(1, -1), seconds, compiled, tau)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_threshold(top: float, dtype: torch.dtype) -> float:
    """The top-2 logit gap under which HF's greedy choice counts as a near-tie: ``NEAR_TIE``, or in a
    half-precision model ``NEAR_TIE_ULPS`` units in the last place of its dtype at the top logit ``top``."""
    info = torch.finfo(dtype)
    ulp = info.eps * 2.0 ** math.floor(math.log2(max(abs(top), info.tiny)))
    return max(NEAR_TIE, NEAR_TIE_ULPS * ulp)


def _top2_gap(model, prefix: torch.Tensor) -> tuple[float, float]:
    """HF eager's margin between its two best next-token logits after ``prefix``, and the near-tie threshold."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=prefix.to(device)).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1]), near_tie_threshold(float(top[0]), logits.dtype)


def compare_outputs(model, ids: torch.Tensor, ref: torch.Tensor, out: torch.Tensor) -> dict | None:
    """None if ``out`` equals the reference; else where and how it first differs."""
    n = ids.shape[1]
    ref_ids, out_ids = ref[0].tolist(), out[0].tolist()
    at = _first_difference(ref_ids, out_ids)
    if at is None:
        return None
    d = {"position": at - n, "hf_token": None, "method_token": None, "hf_top2_gap": None, "near_tie": False}
    if at < n:
        d["reason"] = "the output does not start with the prompt"
        return d
    if at < len(ref_ids):
        d["hf_token"] = ref_ids[at]
    if at < len(out_ids):
        d["method_token"] = out_ids[at]
    if d["hf_token"] is None or d["method_token"] is None:
        d["reason"] = "stopped at a different length"
        return d
    gap, threshold = _top2_gap(model, ref[:, :at])
    d["hf_top2_gap"], d["near_tie_threshold"] = gap, threshold
    d["near_tie"] = gap < threshold
    d["reason"] = "near-tie" if d["near_tie"] else "different token"
    return d


def _report(args, results: _Results, questions, prompts, model, tokenizer, cfg: BenchConfig, prompts_path) -> dict:
    names = results.names
    per_prompt = []
    mismatches = []
    for q, ids, runs in zip(questions, prompts, results.runs, strict=True):
        ref = runs[REFERENCE].out
        entry = {
            "question_id": q["question_id"],
            "category": q["category"],
            "prompt_tokens": ids.shape[1],
            "methods": {},
        }
        for name in names:
            run = runs[name]
            new = run.out.shape[1] - ids.shape[1]
            m = {
                "new_tokens": new,
                "seconds": run.seconds,
                "tokens_per_s": new / run.seconds if run.seconds else 0.0,
                "identical": True,
                "graphs_compiled": run.compiled,
                "tau": run.tau,
            }
            if name == REFERENCE:
                m["new_ids"] = run.out[0, ids.shape[1] :].tolist()
            else:
                diff = compare_outputs(model, ids, ref, run.out)
                if diff is not None:
                    m["identical"] = False
                    m["mismatch"] = diff
                    m["new_ids"] = run.out[0, ids.shape[1] :].tolist()
                    mismatches.append(
                        {"question_id": q["question_id"], "category": q["category"], "method": name, **diff}
                    )
            entry["methods"][name] = m
        per_prompt.append(entry)

    def speed(name: str, entries) -> float:
        tokens = sum(e["methods"][name]["new_tokens"] for e in entries)
        seconds = sum(e["methods"][name]["seconds"] for e in entries)
        return tokens / seconds if seconds else 0.0

    summary = {}
    ref_speed = speed(REFERENCE, per_prompt)

    def mean_tau(name: str) -> float | None:
        taus = [e["methods"][name]["tau"] for e in per_prompt if e["methods"][name]["tau"] is not None]
        return sum(taus) / len(taus) if taus else None

    for name in names:
        own = [m for m in mismatches if m["method"] == name]
        tps = speed(name, per_prompt)
        summary[name] = {
            "tokens_per_s": tps,
            "ratio": tps / ref_speed if ref_speed else 0.0,
            "new_tokens": sum(e["methods"][name]["new_tokens"] for e in per_prompt),
            "seconds": sum(e["methods"][name]["seconds"] for e in per_prompt),
            "setup_s": results.setup_s[name],
            "warm_up_s": results.warm_up_s[name],
            "graphs_compiled_while_timed": sum(e["methods"][name]["graphs_compiled"] for e in per_prompt),
            "identical": not own,
            "mismatches": sum(not m["near_tie"] for m in own),
            "near_ties": sum(m["near_tie"] for m in own),
            "tau": mean_tau(name),
            "note": results.notes.get(name, ""),
        }
    categories = {}
    for cat in dict.fromkeys(q["category"] for q in questions):
        entries = [e for e in per_prompt if e["category"] == cat]
        base = speed(REFERENCE, entries)
        categories[cat] = {
            "prompts": len(entries),
            **{
                n: {"tokens_per_s": speed(n, entries), "ratio": speed(n, entries) / base if base else 0.0}
                for n in names
            },
        }
    failed = any(not m["near_tie"] for m in mismatches)
    machine = machine_info(args.threads, cfg.device)
    command = _command_line(args, cfg, prompts_path)
    data = {
        "command": command,
        "machine": machine,
        "config": {
            "model": args.model,
            "prompts": str(prompts_path),
            "num_prompts": len(questions),
            "max_new_tokens": cfg.max_new_tokens,
            "methods": names,
            "backend": cfg.backend,
            "threads": args.threads,
            "device": str(cfg.device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "max_cache_len": cfg.max_cache_len,
            "near_tie": NEAR_TIE,
            "near_tie_ulps": NEAR_TIE_ULPS,
        },
        "summary": summary,
        "skipped": dict(results.skipped),
        "categories": categories,
        "mismatches": mismatches,
        "prompts": per_prompt,
        "exit_code": 1 if failed else 0,
    }
    tables = _summary_table(names, summary, results.skipped) + "\n\n" + _category_table(names, categories)
    notes = [f"{name}: {summary[name]['note']}" for name in names if summary[name]["note"]]
    notes += [f"SKIPPED: {name}: {why}" for name, why in results.skipped.items()]
    notes += _mismatch_lines(mismatches, tokenizer)
    for name in names:
        if summary[name]["graphs_compiled_while_timed"]:
            notes.append(
                f"WARNING: {name} compiled {summary[name]['graphs_compiled_while_timed']} graph(s) during "
                "timed runs; its tokens/s include compilation"
            )
    text = tables + ("\n\n" + "\n".join(notes) if notes else "")
    if failed:
        text += "\n\nFAILED: some outputs differ from hf_eager's beyond near-ties of its top-2 logits."
    markdown = _markdown(data, tables, notes)
    return {"json": data, "text": text, "markdown": markdown}


def _summary_table(names, summary, skipped: dict[str, str] | None = None) -> str:
    rows = [
        "| method | tokens/s | vs hf_eager | tau | setup s | warm-up s | identical to hf_eager |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        s = summary[name]
        if name == REFERENCE:
            same = "(reference)"
        elif s["mismatches"]:
            same = f"**no** ({s['mismatches']} prompt(s) differ)"
        else:
            same = "yes"
        if s["near_ties"]:
            same += f", {s['near_ties']} near-tie(s)"
        tau = "" if s["tau"] is None else f"{s['tau']:.2f}"
        rows.append(
            f"| {name} | {s['tokens_per_s']:.2f} | {s['ratio']:.2f}x | {tau} | {s['setup_s']:.1f} | "
            f"{s['warm_up_s']:.1f} | {same} |"
        )
    for name, why in (skipped or {}).items():
        rows.append(f"| {name} | | | | | | skipped: {_table_cell(why)} |")
    return "\n".join(rows)


def _table_cell(text: str) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _category_table(names, categories) -> str:
    others = [n for n in names if n != REFERENCE]
    rows = [
        "| category | prompts | hf_eager tokens/s | " + " | ".join(f"{n} vs hf_eager" for n in others) + " |",
        "|---|---:|---:|" + "---:|" * len(others),
    ]
    for cat, c in categories.items():
        ratios = " | ".join(f"{c[n]['ratio']:.2f}x" for n in others)
        rows.append(f"| {cat} | {c['prompts']} | {c[REFERENCE]['tokens_per_s']:.2f} | {ratios} |")
    return "\n".join(rows)


def _mismatch_lines(mismatches, tokenizer) -> list[str]:
    def tok(t):
        return "(end)" if t is None else f"{t} {tokenizer.decode([t])!r}"

    lines = []
    for m in sorted(mismatches, key=lambda m: m["near_tie"]):
        what = "near-tie (tolerated)" if m["near_tie"] else "MISMATCH"
        gap = "" if m["hf_top2_gap"] is None else f", HF top-2 logit gap {m['hf_top2_gap']:.2e}"
        if m["hf_top2_gap"] is not None:
            gap += f" (near-tie below {m['near_tie_threshold']:.2e})"
        lines.append(
            f"{what}: {m['method']} on question {m['question_id']} ({m['category']}): first difference at "
            f"new token {m['position']}: hf_eager {tok(m['hf_token'])}, {m['method']} "
            f"{tok(m['method_token'])}{gap}"
        )
    return lines


def _markdown(data, tables: str, notes: list[str]) -> str:
    c, mach = data["config"], data["machine"]
    lines = [
        f"## {_model_label(c['model'])}: {c['num_prompts']} Spec-Bench prompts, {c['max_new_tokens']} new tokens ({mach['date']})",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"- CPU: {mach['cpu']} ({mach['logical_cpus']} logical CPUs), {mach['threads']} torch threads",
        *([f"- GPU: {mach['gpu']}, device {c['device']}"] if mach.get("gpu") else []),
        f"- torch {mach['torch']}, transformers {mach['transformers']}, specpass {mach['specpass']}, "
        f"Python {mach['python']}",
        f"- greedy, batch 1, methods alternating per prompt in one process; max_cache_len {c['max_cache_len']}; "
        f"specpass backend {c['backend']}; {c['dtype']} on {c['device']}",
        "- tokens/s: all new tokens over all timed seconds; tau: mean tokens per verify step, where a method "
        "reports it; setup: method setup (specpass: its compilation; hf_early_exit: its choice of k); "
        "warm-up: untimed first generations (hf_static_compile compiles here)",
        "",
        tables,
        "",
    ]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _model_label(name: str) -> str:
    from specpass.models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if name == "default" else name


def machine_info(threads: int, device: torch.device | None = None) -> dict:
    import transformers

    import specpass

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specpass": specpass.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
    }


def _command_line(args, cfg: BenchConfig, prompts_path: Path) -> str:
    """The command that reproduces this run, every option spelled out."""
    parts = ["specpass", "bench", "--model", args.model]
    if args.prompts is not None:
        parts += ["--prompts", str(args.prompts)]
    parts += [
        "--num-prompts",
        str(args.num_prompts),
        "--max-new-tokens",
        str(cfg.max_new_tokens),
        "--methods",
        args.methods,
        "--backend",
        cfg.backend,
        "--threads",
        str(args.threads),
        "--device",
        str(cfg.device),
        *(["--dtype", args.dtype] if args.dtype else []),
        *(["--plan", args.plan] if args.plan else []),
        "--max-cache-len",
        str(cfg.max_cache_len),
    ]
    return shlex.join(parts)


def _graphs_compiled() -> int:
    """How many graphs torch.compile has produced so far in this process (to catch compiles during timing)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def _default_cache_len(model, needed: int) -> int:
    """``needed`` rounded up to a multiple of 64, but not past the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    rounded = -(-needed // 64) * 64
    return min(rounded, limit) if limit and limit >= needed else rounded


def _write(path: str, text: str) -> None:
    try:
        Path(path).expanduser().write_text(text, encoding="utf-8")
    except OSError as e:
        raise SpecPassError(f"cannot write {path}: {e}") from e
    log.info("wrote %s", path)
