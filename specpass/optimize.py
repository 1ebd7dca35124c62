"""``specpass.optimize(model)``: capture, rewrite, lower, and wrap the programs in a generate()-able model."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from specpass.capture import CapturedGraph, capture, example_inputs, program_dynamic_shapes
from specpass.errors import SpecPassError
from specpass.lower import BACKENDS, lower
from specpass.passes import PIPELINES, draft_pipeline, run_passes
from specpass.runtime.generate import GenerationStats, StopChecker, generate, speculative_generate
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.sampling import SamplingConfig

log = logging.getLogger("specpass")


# HF's own fallbacks for unset generation parameters (GenerationConfig._get_default_generation_params).
# With neither max_new_tokens nor max_length set anywhere, HF generates 20 new tokens.
_HF_DEFAULTS = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 1.0}

# generation_config settings that change HF's output and that specpass does not implement, with the value
# that means "off". A model that sets one gets a SpecPassError instead of silently different tokens.
_UNSUPPORTED = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "penalty_alpha": None,
}


class SpecModel:
    """A compiled HF causal LM. ``generate`` returns what ``model.generate`` would, faster."""

    def __init__(self, model: nn.Module, captured: CapturedGraph, programs: dict, backend: str, compile_s: float):
        self.model = model
        self.captured = captured
        self.programs = programs
        self.backend = backend
        self.compile_s = compile_s
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.cache = KVCache(captured.spec, device=next(model.parameters()).device)
        self.last_stats: GenerationStats | None = None
        self.plan = None  # a SpecPlan: speculative decoding when it says so and its drafts are ready
        self._draft_key = None

    @property
    def speculative(self) -> bool:
        if self.plan is None or not self.plan.speculate:
            return False
        return bool(self.plan.lookup) or (self.plan.has_draft and "draft" in self.programs)

    @property
    def max_cache_len(self) -> int:
        return self.captured.spec.max_cache_len

    def _default(self, name: str, value):
        """An argument, else the model's generation_config, else HF's fallback."""
        if value is None and self.generation_config is not None:
            value = getattr(self.generation_config, name, None)
        return _HF_DEFAULTS.get(name) if value is None else value

    def _check_generation_config(self) -> None:
        for name, off in _UNSUPPORTED.items():
            value = getattr(self.generation_config, name, None)
            if value is not None and value != off:
                raise SpecPassError(
                    f"generation_config.{name}={value!r} changes HF's output and is not supported by specpass; "
                    f"unset it (model.generation_config.{name} = None) before specpass.optimize()"
                )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
        streamer=None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Like ``model.generate``: returns (1, prompt + new) ids. Unset arguments come from generation_config."""
        input_ids = self._check_ids(input_ids)
        if attention_mask is not None:
            input_ids = self._strip_left_padding(input_ids, attention_mask)
        self._check_generation_config()
        if max_new_tokens is None:
            max_new_tokens = getattr(self.generation_config, "max_new_tokens", None)
        max_length = getattr(self.generation_config, "max_length", None)
        if max_new_tokens is None and max_length is not None:  # a model's max_length counts the prompt too
            max_new_tokens = max_length - input_ids.shape[1]
            if max_new_tokens < 1:
                raise SpecPassError(
                    f"the prompt ({input_ids.shape[1]} tokens) fills generation_config.max_length; pass max_new_tokens"
                )
        max_new_tokens = self._default("max_new_tokens", max_new_tokens)
        if max_new_tokens < 1:
            raise SpecPassError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.max_cache_len:
            raise SpecPassError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                f"max_cache_len={self.max_cache_len}; pass a larger max_cache_len to specpass.optimize()"
            )
        sampling = SamplingConfig(
            do_sample=bool(self._default("do_sample", do_sample)),
            temperature=float(self._default("temperature", temperature)),
            top_k=self._default("top_k", top_k),
            top_p=self._default("top_p", top_p),
        )
        eos = self._default("eos_token_id", eos_token_id)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stop = StopChecker(max_new_tokens, eos, stop_strings or [], tokenizer)
        if self.speculative:
            out, self.last_stats = speculative_generate(
                self.programs,
                self.cache,
                input_ids,
                policy=self.plan.policy(),
                sampling=sampling,
                stop=stop,
                streamer=streamer,
                generator=generator,
            )
        else:
            out, self.last_stats = generate(
                self.programs,
                self.cache,
                input_ids,
                sampling=sampling,
                stop=stop,
                streamer=streamer,
                generator=generator,
            )
        return out

    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise SpecPassError("input_ids must be an integer torch.Tensor of shape (1, n)")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise SpecPassError(f"input_ids must have shape (1, n) with n >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise SpecPassError(
                f"batch size {input_ids.shape[0]} is not supported yet: specpass generates one sequence at a time; "
                "call generate() once per prompt"
            )
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise SpecPassError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        return input_ids.long()

    @staticmethod
    def _strip_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Batch 1: left padding is masked out by HF and positions restart after it, so dropping it is the
        # same computation. Holes anywhere else are not something generate() of one sequence produces.
        mask = attention_mask.reshape(-1).bool()
        if mask.shape[0] != input_ids.shape[1]:
            raise SpecPassError(f"attention_mask has {mask.shape[0]} entries for {input_ids.shape[1]} input ids")
        keep = int(mask.sum())
        if keep == 0 or not bool(mask[-keep:].all()):
            raise SpecPassError("attention_mask must be ones after optional left padding (batch 1)")
        return input_ids[:, -keep:]


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
) -> SpecModel:
    """Compile ``model`` for lossless generation.

    ``speculate="auto"`` calibrates (or reuses a cached SpecPlan, or takes ``plan=``) and speculates only when
    a draft measured faster than plain compiled decoding; ``True`` always speculates (the best draft found);
    ``False`` compiles plain decoding only. ``tokenizer``/``prompts`` feed calibration (see specpass.calibrate).
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
    for name in tqdm(("prefill", "decode"), desc=f"specpass: compiling ({backend})", disable=not progress):
        gm = run_passes(captured.gm, PIPELINES[name], captured.structure)
        # decode takes any number of tokens: one in plain decoding, the verified chain in speculation.
        programs[name] = lower(
            gm,
            backend,
            name=name,
            example_args=example_inputs(captured.spec, q=2, device=device),
            dynamic_shapes=program_dynamic_shapes(captured.spec, dynamic_q=True, rewritten=True),
        )
    sm = SpecModel(model, captured, programs, backend, time.perf_counter() - t0)
    if speculate is False:
        log.info("optimized %s with %s in %.1fs", type(model).__name__, backend, sm.compile_s)
        return sm

    if plan is None:
        key = model_hash(model)
        plan = cached_plan(key)
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
        build_draft_programs(sm, plan)
        sm.plan = dataclasses.replace(plan, speculate=True)
    sm.compile_s = time.perf_counter() - t0
    log.info("optimized %s with %s in %.1fs: %s", type(model).__name__, backend, sm.compile_s, sm.plan.describe())
    return sm


def build_draft_programs(sm: SpecModel, plan) -> None:
    """Run the draft passes for ``plan`` and lower the draft program (a one-token step) into ``sm.programs``;
    a plan without one (lookup only) leaves none there."""
    if not plan.has_draft:
        sm.programs.pop("draft", None)
        sm._draft_key = None
        return
    key = plan.draft_key()
    if sm._draft_key == key:
        return
    device = next(sm.model.parameters()).device
    cfg = plan.draft_config(device)
    gm = run_passes(sm.captured.gm, draft_pipeline(cfg), sm.captured.structure, cfg)
    sm.programs["draft"] = lower(
        gm,
        sm.backend,
        name="draft",
        example_args=example_inputs(sm.captured.spec, q=1, device=device),
        dynamic_shapes=program_dynamic_shapes(sm.captured.spec, dynamic_q=False, rewritten=True),
    )
    sm._draft_key = key


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
