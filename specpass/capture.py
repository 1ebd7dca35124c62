"""Capture a Hugging Face causal LM as a torch.export graph with a runtime-owned cache.

The exported program's signature is the contract between capture, the passes and the runtime::

    logits = program(input_ids, position_ids, cache_position, *masks, *cache)

- ``input_ids``, ``position_ids``: (B, q) int64; ``q`` is dynamic (but see recurrent state below).
- ``cache_position``: (q,) int64, the cache slot each query token's K/V is written to. Slots and positions
  differ on purpose: a draft tree writes its nodes to consecutive scratch slots while their rotary
  positions follow tree depth.
- ``masks``: one additive float mask (B, 1, q, W) per attention kind of the model (``full``; ``sliding``
  for sliding-window layers; ``chunked`` for Llama 4's chunked layers), 0 where a query may attend and
  ``finfo.min`` elsewhere. The width W <= max_cache_len is dynamic too: attention reads the first W cache
  slots only. The runtime builds the masks, so causal, padded and tree attention are all the same program.
- ``cache``: the tensors of ``CacheSpec.tensors``, layer by layer. An attention layer has K and V (B, heads,
  max_cache_len + 1, head_dim), each of its own shape (multi-head latent attention's K and V head dims
  differ, Gemma 4's layers differ), written in place with ``aten.index_copy_``. A linear-attention or
  state-space layer has its conv state and recurrent state, which each call reads and overwrites. A layer
  that reuses another layer's K/V (Gemma 3n) or keeps nothing (MLP-only layers) has none. The runtime owns
  them all; the graph never allocates a cache.

The graph's inputs are named ``input_ids, position_ids, cache_position, mask_full_attention`` / ... (one per
kind, in ``CacheSpec.mask_kinds`` order), then ``k_0, v_0, conv_1, recurrent_1, ...``; calls stay positional.

Recurrent state: transformers' linear-attention and state-space layers choose their code path from the query
length in Python (a one-token recurrent step; a chunked scan, or a loop over tokens, otherwise), which
torch.export can only trace for one length at a time. Such models are captured per query length
(``CapturedGraph.at``), and the runtime runs a call as pieces of power-of-two lengths (runtime/pieces.py).

transformers' own export recipe (``TorchExportableModuleWithStaticCache``) takes neither a mask nor position
ids, so it cannot verify trees; hence this wrapper.

Every capture checks itself before it returns: the model must be causal (a prefix's logits do not depend on
later tokens), and the captured graph, run like the runtime runs it (a prefill, then one-token steps; for
recurrent state also two-token steps), must reproduce the model's own forward. A model that takes its
positions from a source the runtime does not provide, or is an encoder, fails here with a ``SpecPassError``
that says so, instead of generating different tokens later. Models whose attention or positions ignore the
inputs they are given get an adapter while they are traced (attention_adapters.py: BLOOM's ALiBi, GPT-Neo's
local attention; position_adapters.py: position tables counted from the cache length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn

from specpass import attention_adapters
from specpass.cache_layout import cache_spec, error_summary, forward_logits, probe_ids, rel_err, tolerance
from specpass.cache_spec import CacheSpec
from specpass.errors import SpecPassError
from specpass.hf_cache import CaptureWrapper, text_config
from specpass.program_export import example_inputs, export_program, program_dynamic_shapes
from specpass.runtime.kv_cache import KVCache
from specpass.structure import Structure, analyze

log = logging.getLogger("specpass.capture")


@dataclasses.dataclass
class CapturedGraph:
    """The exported program of an HF causal LM, its structure, and the cache layout it expects.

    ``query_len``: None when the graph takes any number of tokens per call. Models with recurrent state are
    captured per number of tokens instead (see capture()): this graph takes exactly ``query_len``, ``at(q)``
    exports the same model for q, and a call of more tokens is split into pieces of at most
    ``max_query_len`` (runtime/pieces.py).
    """

    exported: torch.export.ExportedProgram
    gm: torch.fx.GraphModule  # unlifted training IR: parameters as attributes, KV inputs mutated in place
    structure: Structure
    spec: CacheSpec
    model_type: str
    query_len: int | None = None
    max_query_len: int | None = None
    wrapper: CaptureWrapper | None = dataclasses.field(default=None, repr=False)
    _by_len: dict = dataclasses.field(default_factory=dict, repr=False)

    def at(self, query_len: int) -> CapturedGraph:
        """The same model captured for calls of exactly ``query_len`` tokens (exported once, then cached)."""
        if self.query_len is None or query_len == self.query_len:
            return self
        if query_len not in self._by_len:
            with _quiet_transformers():
                graph = _export(self.wrapper, self.spec, query_len)
            graph.max_query_len, graph._by_len = self.max_query_len, self._by_len
            self._by_len[query_len] = graph
        return self._by_len[query_len]


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise SpecPassError(f"{name} is not a Hugging Face model (no .config); pass an AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise SpecPassError(
            f"{name} is an encoder-decoder model; specpass needs a decoder-only causal LM (AutoModelForCausalLM)"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise SpecPassError(f"{name}: LM head not found (get_output_embeddings() is None); it is not a causal LM")
    # Encoders with an LM head (BERT and friends) pass these checks; the causality probe refuses them.


#: models with recurrent state: the longest call one program runs; longer ones are split (runtime/pieces.py)
MAX_PIECE = 64

#: the cache length when none is given, if the model's positions reach that far
DEFAULT_CACHE_LEN = 1024


def position_limit(model: nn.Module) -> int | None:
    """The model's maximum number of positions, where its config says."""
    config = text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def default_cache_len(model: nn.Module) -> int:
    """``DEFAULT_CACHE_LEN``, or the model's position limit where that is smaller."""
    limit = position_limit(model)
    return min(DEFAULT_CACHE_LEN, limit) if limit else DEFAULT_CACHE_LEN


def rounded_cache_len(model: nn.Module, needed: int, step: int) -> int:
    """``needed`` rounded up to a multiple of ``step``, but not past the model's position limit: runs whose lengths
    differ a little then share one cache size, so one set of compiled programs (the program cache's key)."""
    limit = position_limit(model)
    rounded = -(-needed // step) * step
    return min(rounded, limit) if limit and limit >= needed else rounded


def capture(model: nn.Module, *, max_cache_len: int | None = None) -> CapturedGraph:
    """Export ``model`` to a training-IR graph with a runtime-owned KV cache; see the module docstring.

    ``max_cache_len``: the longest prompt + answer; default ``default_cache_len(model)``.
    """
    _check_model(model)
    if max_cache_len is None:
        max_cache_len = default_cache_len(model)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int):
        raise SpecPassError(f"max_cache_len must be an int, got {max_cache_len!r}")
    if max_cache_len < 2:
        raise SpecPassError(f"max_cache_len must be >= 2, got {max_cache_len}")
    limit = position_limit(model)
    if limit and max_cache_len > limit:
        raise SpecPassError(
            f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={limit}; pass a smaller one"
        )
    config = text_config(model.config)
    floor = getattr(config, "floor_scale", None)
    if getattr(config, "attn_temperature_tuning", False) and floor and max_cache_len >= floor:
        # Its scale is log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1, with pos counted from the
        # cache length rather than position_ids; below floor_scale - 1 it is exactly 1 whatever the count.
        raise SpecPassError(
            f"{type(model).__name__}: Llama 4's attention temperature tuning counts positions from the cache "
            f"length, which a runtime-owned cache does not provide; it is exact for max_cache_len <= {floor - 1}: "
            "pass a smaller one"
        )
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl not in (None, "sdpa", "eager"):
        raise SpecPassError(
            f"attention implementation '{attn_impl}' cannot take an explicit mask; "
            "load the model with attn_implementation='sdpa'"
        )
    model.eval()
    with _quiet_transformers():
        return _capture(model, max_cache_len)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings while specpass traces and checks the model (e.g. that a reference kernel stands
    in for a fused one) are about HF's eager path, not about the compiled programs: keep them out of specpass's
    output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _capture(model: nn.Module, max_cache_len: int) -> CapturedGraph:
    spec = cache_spec(model, max_cache_len)
    config = text_config(model.config)
    declared = attention_adapters.layer_kinds(config)[0]
    layer_types = tuple(declared) if declared else None
    wrapper = CaptureWrapper(model, spec, layer_types).eval()
    if not spec.has_state:
        captured = _export(wrapper, spec, None)
        n = min(5, spec.max_cache_len)
        _validate({None: captured}, model, spec, [max(1, n - 2)] + [1] * (n - max(1, n - 2)))
    else:
        # transformers' linear-attention and state-space layers branch on the query length in Python (a
        # one-token recurrent step, a chunked scan otherwise, loops over tokens or chunks), which torch.export
        # can only trace for one length at a time: each length gets a program of its own (CapturedGraph.at).
        captured = _export(wrapper, spec, 1)
        captured.max_query_len = MAX_PIECE
        _validate({1: captured}, model, spec, [1] * min(5, spec.max_cache_len))
        try:
            _validate({1: captured, 2: captured.at(2)}, model, spec, [1, 2, 2][: max(1, spec.max_cache_len - 2)])
        except SpecPassError as e:
            # Mamba's reference scan ignores the previous state when it reads several tokens, so its calls
            # of several tokens are not the model: run them one token at a time (still lossless).
            captured.max_query_len = 1
            log.info("%s: calls of several tokens run one token at a time: %s", type(model).__name__, e)
    log.info(
        "captured %s: %d layers, %d graph nodes", type(model).__name__, spec.num_layers, len(captured.gm.graph.nodes)
    )
    return captured


def _export(wrapper: CaptureWrapper, spec: CacheSpec, query_len: int | None) -> CapturedGraph:
    """Export ``wrapper`` for any number of tokens per call (``query_len=None``) or exactly ``query_len``."""
    model = wrapper.model
    args = example_inputs(spec, q=query_len or 2, device=next(model.parameters()).device)

    def export(proof_free: bool):
        flat = program_dynamic_shapes(spec, dynamic_q=query_len is None, rewritten=proof_free)
        # The wrapper's varargs (*masks, *cache) form one pytree entry of its signature.
        return export_program(wrapper, args, (*flat[:3], flat[3:]))

    try:
        try:
            exported = export(False)
        except Exception as e:  # noqa: BLE001
            # Guards that hold for every q but that export cannot prove (Llama 4: q * min(64, 64 q) == 64 q):
            # export again without demanding the proof; the check below sees whether q stayed symbolic.
            if query_len is not None or "Constraints violated (q)" not in str(e):
                raise
            exported = export(True)
    except SpecPassError:
        raise
    except Exception as e:  # noqa: BLE001 - surface any tracing failure as a capture error with its cause
        raise SpecPassError(f"{type(model).__name__}: torch.export failed: {error_summary(e)}") from e
    gm = exported.module()
    _rename_inputs(gm, spec)
    structure = analyze(gm, wrapper, spec)
    if len(structure.kv) != len(spec.tensors):
        raise SpecPassError(f"captured graph has {len(structure.kv)} cache inputs, expected {len(spec.tensors)}")
    if query_len is None and not isinstance(structure.input_ids.meta["val"].shape[1], torch.SymInt):
        raise SpecPassError(
            f"{type(model).__name__}: torch.export fixed the number of tokens per call instead of keeping it dynamic"
        )
    width = structure.masks[0].meta["val"].shape[-1]
    if not isinstance(width, torch.SymInt) and _reads(structure.masks[0]):
        # The runtime attends to as few slots as a sequence needs; a width fixed at export would fail there.
        raise SpecPassError(
            f"{type(model).__name__}: torch.export fixed the attention mask width at {width} instead of keeping it "
            "dynamic; the model's attention specialises on the key length"
        )
    config = text_config(model.config)
    return CapturedGraph(exported, gm, structure, spec, getattr(config, "model_type", "?"), query_len, wrapper=wrapper)


def input_names(spec: CacheSpec) -> list[str]:
    """The captured program's argument names, in order: ids, positions, slots, one mask per kind, the cache."""
    return ["input_ids", "position_ids", "cache_position", *[f"mask_{kind}" for kind in spec.mask_kinds], *spec.names()]


def _rename_inputs(gm: torch.fx.GraphModule, spec: CacheSpec) -> None:
    """Give the placeholders readable, stable names (export calls the varargs ``rest_0, rest_1, ...``).

    The unlifted module flattens its inputs with a pytree codegen whose argument list is the placeholder
    names, so that list is renamed with them; calling stays positional and unchanged.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = input_names(spec)
    if len(placeholders) != len(names):
        raise SpecPassError(f"captured graph has {len(placeholders)} inputs; expected {len(names)}: {names}")
    taken = {n.name for n in gm.graph.nodes if n.op != "placeholder"} & set(names)
    for node in gm.graph.nodes:  # free the names first (no op node is called k_0 today, but be sure)
        if node.name in taken:
            node._rename(f"{node.name}_op")
    for node, name in zip(placeholders, names, strict=True):
        node.target = name
        node._rename(name)
        if node.name != name:
            raise SpecPassError(f"could not rename the graph input {node.name!r} to {name!r}")
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        codegen.pytree_info = info._replace(orig_args=list(names))
    gm.recompile()


def _validate(graphs: dict, model: nn.Module, spec: CacheSpec, steps: list[int]) -> None:
    """Run the captured graph as the runtime will (a prefill, then steps of ``steps[1:]`` tokens) against the
    model's own full forward, on a few tokens: a model that computes something else than its eager self
    (positions taken from the cache length, masks rebuilt from a 2D mask, ...) is refused here, not discovered
    in generate(). ``graphs``: query length -> CapturedGraph (``None``: any length)."""
    name = type(model).__name__
    n = sum(steps)
    ids = probe_ids(model, n)
    with torch.no_grad():
        try:
            want = forward_logits(model, ids)
        except Exception as e:  # noqa: BLE001 - the model's own forward fails: nothing to compare against
            raise SpecPassError(
                f"{name}: the model's own forward failed on a {n}-token probe: {error_summary(e)}"
            ) from e

        cache = KVCache(spec, device=ids.device)
        start = 0
        for k, q in enumerate(steps):
            slots = torch.arange(start, start + q, device=ids.device)
            # The prefill attends to every slot, the decode steps to as few as cover the sequence: both ends of
            # the dynamic mask width.
            width = spec.max_cache_len if k == 0 else max(2, start + q)
            cache.length = start
            masks = cache.chain_masks(q, width)
            graph = graphs.get(q, graphs.get(None))
            try:
                got = graph.gm(ids[:, start : start + q], slots[None], slots, *masks, *cache.tensors)
            except Exception as e:  # noqa: BLE001 - the graph does not run on the runtime's inputs
                raise SpecPassError(f"{name}: the captured graph fails on a {q}-token step: {error_summary(e)}") from e
            err = rel_err(got, want[:, start : start + q])
            if not err <= tolerance(want.dtype):  # NaN fails too
                step = "the prefill" if k == 0 else f"decode step {k}"
                why = ""
                if not _reads(graph.structure.position_ids) and graph.wrapper.cache_argument != "cache_params":
                    why = (
                        "; the graph never reads position_ids: the model derives positions another way (e.g. from "
                        "the cache length), which a runtime-owned cache does not provide"
                    )
                raise SpecPassError(
                    f"{name}: the captured graph does not reproduce the model: its logits differ from the model's "
                    f"own forward at {step} of {q} token(s) (relative error {err:.1e}){why}"
                )
            start += q


def _reads(node: torch.fx.Node) -> bool:
    """Whether any computation uses ``node`` (export's input guards and metadata asserts do not count)."""
    for user in node.users:
        if user.op == "call_module" and str(user.target).startswith("_guards"):
            continue
        if user.op == "call_function" and "assert" in getattr(user.target, "__name__", str(user.target)):
            continue
        return True
    return False
