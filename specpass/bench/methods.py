"""The benchmark's methods: HF's baselines, the PyPI peers and specpass, each set up as a ``Runner``.

Methods live in ``METHODS``: a name, and ``setup(model, tokenizer, cfg) -> Runner`` where the runner's
``generate(input_ids) -> output ids`` behaves like ``model.generate`` (prompt + new ids). A new peer is one
more entry there; the loop does not change. A setup that raises ``MethodUnavailable`` (a peer package that is
not installed, a model it does not support) is reported as skipped, and the other methods run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from specpass import cpu_level
from specpass.bench.llamacpp_process import LEVEL_BUILD, LlamaCppDied, LlamaProcess, wider_than
from specpass.errors import SpecPassError

log = logging.getLogger("specpass.bench")


REFERENCE = "hf_eager"
# Untimed warm-up prompts, of different lengths so that a compiled prefill meets two shapes before timing.
WARM_UP_MESSAGES = (
    "Say hello.",
    "Write one sentence about the sea, then one sentence about the mountains, then one about the sky.",
)
HF_PROMPT_LOOKUP_TOKENS = 10  # HF's documented suggestion for prompt_lookup_num_tokens
EARLY_EXIT_FRACTIONS = (0.25, 0.5, 0.75)  # hf_early_exit tries these fractions of the layers, keeps the fastest
EARLY_EXIT_PROBE_TOKENS = 32  # new tokens of each timed probe generation while choosing the exit layer
ECONOMIZE_SKIP_FRACTION = 0.4  # economize_layer_skip skips this share of the layers (its README's 10 of 24)
LLAMACPP_LOOKUP_TOKENS = 10  # llama-cpp-python's LlamaPromptLookupDecoding default num_pred_tokens

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
    exact_lowbit: bool = True  # specpass.optimize(exact_lowbit=...)
    device: torch.device = torch.device("cpu")
    plan: object = None  # a SpecPlan for the specpass methods (None: the cached or calibrated one)
    gguf: object = None  # the GGUF file the model was converted from (a Path; None: none), for llama.cpp
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
    own: bool = False  # specpass's: a failure while it runs fails the bench (a peer's is reported and skipped)
    #: False: not meant to give HF's tokens (llama.cpp rounds activations to 8 bits); its identical count is
    #: reported, but its differences do not fail the run
    lossless: bool = True


class _DropHFDeprecation(logging.Filter):
    """HF's assisted generation calls its assistant's ``generate`` with a generation config and more arguments,
    which HF itself then calls deprecated: the warning is about HF's own call, not the bench's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing `generation_config` together with" not in record.getMessage()


@contextlib.contextmanager
def _hf_call():
    """``torch.no_grad()`` around one of the bench's HF ``generate`` calls, without HF's deprecation notice about
    its own internal calls (see _DropHFDeprecation)."""
    hf_log = logging.getLogger("transformers.generation.utils")
    quiet = _DropHFDeprecation()
    hf_log.addFilter(quiet)
    try:
        with torch.no_grad():
            yield
    finally:
        hf_log.removeFilter(quiet)


def _setup_hf_eager(model, tokenizer, cfg: BenchConfig) -> Runner:
    kwargs = cfg.hf_generate_kwargs()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with _hf_call():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return Runner(run)


def _setup_hf_static_compile(model, tokenizer, cfg: BenchConfig) -> Runner:
    """HF's documented recipes for a static cache and torch.compile: on a GPU, ``generate``'s own compile
    (``cache_implementation="static"``: decoding compiled with ``CompileConfig``'s reduce-overhead mode, CUDA
    graphs; prefill eager); on a CPU, where ``generate`` does not compile, ``model.forward = torch.compile(...)``.

    Why not the forward recipe on a GPU too: in reduce-overhead mode it made HF's eager cache update read a
    CUDA-graph output that the next replay had overwritten (RuntimeError, torch 2.11 + transformers 5.17 on an
    H200, 2026-11-27). The recipes replace ``forward`` (or cache a compiled call) on the model, which would turn
    the shared model's eager baseline into a compiled one; a shallow copy shares every parameter and submodule but
    holds its own ``forward``, compiled call and generation config. The cache is sized once (``max_cache_len``) for
    all prompts so that its shape, and with it the compiled graphs, never change. A compiled prefill is static for
    the first prompt length and recompiled with a symbolic length at the second, hence two warm-up runs with
    different prompt lengths.
    """
    compiled = copy.copy(model)
    config = copy.deepcopy(model.generation_config)
    config.cache_implementation = "static"
    config.max_cache_len = cfg.max_cache_len
    if next(model.parameters()).device.type == "cuda":
        from transformers import CompileConfig

        config.disable_compile = False
        config.compile_config = CompileConfig()
        note = "generate's own compile (CompileConfig(): reduce-overhead, CUDA graphs)"
    else:
        config.disable_compile = True  # we compile forward ourselves; generate's auto-compile would wrap it again
        compiled.forward = torch.compile(compiled.forward, fullgraph=True)
        note = ""
    compiled.generation_config = config
    kwargs = cfg.hf_generate_kwargs()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with _hf_call():
            return compiled.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    return Runner(run, warm_up_runs=2, note=note)


def _setup_hf_prompt_lookup(model, tokenizer, cfg: BenchConfig) -> Runner:
    """HF's prompt lookup decoding: drafts copied from n-gram matches in the context, verified by the model."""
    kwargs = {**cfg.hf_generate_kwargs(), "prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS}

    def run(ids: torch.Tensor) -> torch.Tensor:
        with _hf_call():
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
    from specpass.tokenization import chat_ids

    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers or num_layers < 2:
        raise MethodUnavailable(f"early exit needs a model with num_hidden_layers >= 2, got {num_layers}")
    base = cfg.hf_generate_kwargs()
    device = next(model.parameters()).device
    probe = chat_ids(tokenizer, WARM_UP_MESSAGES[1]).to(device)
    probe_kwargs = {**base, "max_new_tokens": min(cfg.max_new_tokens, EARLY_EXIT_PROBE_TOKENS)}

    def generate(ids: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
        with _hf_call():
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


def _import_peer(module: str, install: str | None = None):
    """A peer package, or MethodUnavailable saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MethodUnavailable(f"{module} is not installed ({e}); {install or f'pip install {module}'}") from e


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
    from specpass.tokenization import chat_ids

    economize = _import_peer("economize")
    from economize.techniques.layer_skip import LayerSkipConfig

    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers or num_layers < 2:
        raise MethodUnavailable(f"layer skipping needs a model with num_hidden_layers >= 2, got {num_layers}")
    num_skip = min(max(1, round(ECONOMIZE_SKIP_FRACTION * num_layers)), num_layers - 1)
    keep = 1 if num_skip <= num_layers - 2 else 0  # keep the first and last layers where the model is deep enough
    device = next(model.parameters()).device
    calibration = [chat_ids(tokenizer, m).to(device) for m in WARM_UP_MESSAGES]
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


def _setup_llamacpp(model, tokenizer, cfg: BenchConfig) -> Runner:
    return _llamacpp_runner(cfg, lookup=False)


def _setup_llamacpp_lookup(model, tokenizer, cfg: BenchConfig) -> Runner:
    return _llamacpp_runner(cfg, lookup=True)


def _llamacpp_runner(cfg: BenchConfig, *, lookup: bool) -> Runner:
    """llama.cpp through llama-cpp-python on the GGUF file the model was converted from, given exactly the prompt
    token ids the other methods get (no tokenizer of its own in the loop), greedy (``temp=0``, no penalties),
    torch's thread count for decode and prefill, the KV cache reset before each prompt so that every prompt is
    prefilled in full. ``lookup``: its prompt lookup decoding (``LlamaPromptLookupDecoding``) as draft model.

    One ``Llama`` per method, loaded in setup in a process of its own (``llamacpp_process``: a crash inside
    llama.cpp fails this method, not the run); the bench's untimed warm-up runs first. Not lossless: ggml
    multiplies the 4/8-bit weight blocks by activations rounded to 8-bit blocks (its ``vec_dot_type``), so its
    tokens drift from HF's; the report counts its identical outputs like every method's.
    """
    _import_peer("llama_cpp", "pip install 'specpass[peers]' (builds llama.cpp from source)")
    if cfg.gguf is None:
        raise MethodUnavailable(
            "llama.cpp runs GGUF files and this model was not converted from one (the bundled models were; "
            "--gguf PATH names one)"
        )
    if cfg.device.type != "cpu":
        raise MethodUnavailable(f"the bench runs llama.cpp on the CPU only, not on {cfg.device}")
    threads = torch.get_num_threads()
    tokens = LLAMACPP_LOOKUP_TOKENS if lookup else 0
    try:
        llm = LlamaProcess(cfg.gguf, n_ctx=cfg.max_cache_len, threads=threads, lookup_tokens=tokens)
    except (LlamaCppDied, RuntimeError) as e:  # a peer that cannot load the file leaves the others their run
        raise MethodUnavailable(str(e)) from e
    level = cpu_level.level()
    if level is not None and (wider := wider_than(llm.features, level)):
        llm.close()
        raise MethodUnavailable(
            f"{cpu_level.ENV}={level} but this llama.cpp is built with {', '.join(wider)}; build one for the level "
            f"and point LLAMA_CPP_LIB_PATH at its libraries: {LEVEL_BUILD[level]}"
        )
    eos = set(_eos_list(cfg.eos_token_id))

    def run(ids: torch.Tensor) -> torch.Tensor:
        prompt = ids[0].tolist()
        new = llm.generate(prompt, cfg.max_new_tokens, eos)
        return torch.tensor([prompt + new], dtype=ids.dtype, device=ids.device)

    built = " ".join(llm.features) or "no vector ISA"
    note = f"llama-cpp-python {llm.version} (built for {built}), {Path(cfg.gguf).name}, {threads} threads"
    if lookup:
        note += f", prompt lookup of {LLAMACPP_LOOKUP_TOKENS} tokens"
    return Runner(run, note=note + "; not lossless (8-bit activations)")


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
            exact_lowbit=cfg.exact_lowbit,
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
    why = f"; {plan.reason}" if plan.speculate and plan.reason else ""  # describe() says why it does not
    return Runner(run, tau=tau, note=f"plan: {plan.describe()}{why}")


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
            "llamacpp",
            "llama.cpp (llama-cpp-python) greedy on the model's GGUF file; not lossless; skipped if not installed",
            _setup_llamacpp,
            lossless=False,
        ),
        Method(
            "llamacpp_lookup",
            f"llama.cpp with its prompt lookup decoding ({LLAMACPP_LOOKUP_TOKENS} tokens); not lossless",
            _setup_llamacpp_lookup,
            lossless=False,
        ),
        Method(
            "specpass_plain",
            "specpass.optimize(model).generate(speculate=False): its programs, one token per step",
            _setup_specpass_plain,
            own=True,
        ),
        Method("specpass", "specpass.optimize(model) (its default decoding)", _setup_specpass, own=True),
    )
}
DEFAULT_METHODS = tuple(METHODS)  # all of them; peers that are not installed are reported as skipped
