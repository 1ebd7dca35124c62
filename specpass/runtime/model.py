"""``CompiledLM``: compiled programs behind an HF-compatible ``generate`` (what SpecModel and engines share)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpass.cache_spec import CacheSpec
from specpass.errors import SpecPassError
from specpass.runtime.cuda_graphs import GraphedProgram, graph_pool
from specpass.runtime.generate import GenerationStats, StopChecker, generate, speculative_generate, tree_generate
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.recycle import AdjacencyTable
from specpass.runtime.sampling import SamplingConfig

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


#: HF generate options that cannot change one unpadded sequence's tokens, whatever their value
_HARMLESS = ("pad_token_id", "use_cache")


def _check_hf_options(options: dict) -> None:
    """Refuse HF ``generate`` options that would change the output (code ported from HF passes them), name the
    ones that are not generate options at all as Python would."""
    for name, value in options.items():
        if name in _HARMLESS or (name in _UNSUPPORTED and value in (None, _UNSUPPORTED[name])):
            continue
        if name in _UNSUPPORTED:
            raise SpecPassError(
                f"{name}={value!r} changes HF's output and is not supported by specpass, which decodes greedily "
                "or samples (temperature, top_k, top_p); call the HF model's generate for it"
            )
        raise TypeError(f"generate() got an unexpected keyword argument {name!r}")


#: why a model with recurrent state (linear attention, state-space layers) verifies chains, never trees
NO_TREES_WITH_STATE = (
    "draft trees are not supported for models with recurrent state (linear attention, state-space layers): such a "
    "layer reads its tokens in sequence, so each branch of a tree would need a state of its own; chains (lookup, "
    "early exit, layer skipping) are"
)


class CompiledLM:
    """Compiled programs, the KV cache they share, and an HF-compatible ``generate``; needs no HF model.

    ``programs``: ``prefill``, ``decode`` (any number of tokens: plain decoding and verification) and,
    with a plan that has one, ``draft``. ``generation_config``: anything with HF's attribute names.

    ``cuda_graphs``: every program but prefill is replayed from CUDA graphs (runtime/cuda_graphs.py); on by
    default on a CUDA device. Set on a CPU model, the same static-buffer bookkeeping runs without graphs.
    """

    #: what to do when a request does not fit the cache
    _larger_cache = "pass a larger max_cache_len to specpass.optimize()"

    def __init__(self, programs: dict, spec: CacheSpec, *, vocab_size: int, generation_config, device):
        self.programs = programs
        self.spec = spec
        self.vocab_size = vocab_size
        self.generation_config = generation_config
        self.cache = KVCache(spec, device=device)
        self.last_stats: GenerationStats | None = None
        self.plan = None  # a SpecPlan: speculative decoding when it says so and its drafts are ready
        # Token Recycling's table outlives a generate() call: later prompts start with a warm one.
        self.recycled = AdjacencyTable(k=min(8, vocab_size))
        # Models with recurrent state run calls as pieces built on first use (runtime/pieces.py), which a graph
        # capture must not meet: no CUDA graphs for them.
        self.cuda_graphs = self.cache.device.type == "cuda" and not spec.has_state
        self._graphed: dict[str, GraphedProgram] = {}
        self._graph_pool = graph_pool(self.cache.device)

    @property
    def cuda_graphs(self) -> bool:
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool) -> None:
        if value and self.spec.has_state:
            raise SpecPassError(
                "cuda_graphs=True is refused for a model with recurrent state: its calls run as pieces built on "
                "first use, and a graph's warm-up run would advance the state a second time"
            )
        self._cuda_graphs = bool(value)

    @property
    def plan(self):
        return self._plan

    @plan.setter
    def plan(self, plan) -> None:
        if plan is not None and plan.speculate and plan.tree_budget and self.spec.has_state:
            raise SpecPassError(NO_TREES_WITH_STATE)
        self._plan = plan

    def runnable_programs(self) -> dict:
        """The programs as the decode loops call them: replayed from CUDA graphs where ``cuda_graphs`` is set."""
        if not self.cuda_graphs:
            return self.programs
        out = {}
        for name, program in self.programs.items():
            # Prefill takes any prompt length: not worth a graph per length. A program that waits on the host
            # (cuda_graphs.waits_on_host) cannot be captured.
            if name == "prefill" or getattr(program, "waits_on_host", False):
                out[name] = program
                continue
            graphed = self._graphed.get(name)
            if graphed is None or graphed.program is not program:  # a rebuilt draft program gets new graphs
                graphed = GraphedProgram(program, 3 + len(self.spec.mask_kinds), pool=self._graph_pool)
                self._graphed[name] = graphed
            out[name] = graphed
        return out

    @property
    def speculative(self) -> bool:
        if self.plan is None or not self.plan.speculate:
            return False
        if any(name not in self.programs for name in self.plan.program_names()):
            return False
        return self.plan.drafts

    @property
    def max_cache_len(self) -> int:
        return self.spec.max_cache_len

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
        speculate: bool | None = None,
        **hf_options,
    ) -> torch.Tensor:
        """Like ``model.generate``: returns (1, prompt + new) ids. Unset arguments come from generation_config.

        ``speculate=False`` decodes one token per step even when the plan speculates (the output is the same).
        ``hf_options``: HF ``generate`` options at their "off" values are accepted (``num_beams=1``), as is
        ``pad_token_id`` (one sequence is never padded); other values are a SpecPassError, unknown names a TypeError.
        """
        _check_hf_options(hf_options)
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
                f"max_cache_len={self.max_cache_len}; {self._larger_cache}"
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
        common = dict(sampling=sampling, stop=stop, streamer=streamer, generator=generator)
        device, input_ids = input_ids.device, input_ids.to(self.cache.device)
        self.last_stats = None  # not the previous call's numbers, should this one fail
        try:
            out, self.last_stats = self._decode(input_ids, speculate, common)
        except BaseException:
            if streamer is not None:
                streamer.end()  # a stream that started ends, as HF's does when generate returns
            raise
        return out.to(device)

    def _decode(self, input_ids: torch.Tensor, speculate: bool | None, common: dict):
        """The decode loop the plan calls for: (prompt + new ids, its GenerationStats)."""
        programs = self.runnable_programs()
        if not self.speculative or speculate is False:
            return generate(programs, self.cache, input_ids, **common)
        if self.plan.tree_budget:
            return tree_generate(
                programs,
                self.cache,
                input_ids,
                policy=self.plan.policy(),
                table=self.recycled,
                pad_vocab=self.vocab_size if self.cuda_graphs else 0,
                **common,
            )
        return speculative_generate(programs, self.cache, input_ids, policy=self.plan.policy(), **common)

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
        vocab = self.vocab_size
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
