"""``specpass coverage``: try every Hugging Face causal-LM architecture and report which ones are lossless.

For each ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
(the architecture's default config, shrunk), greedy-decodes a few tokens with ``specpass.optimize(model,
backend="eager")`` (plainly, and with a forced lookup + early-exit plan) and with HF ``generate``, and classifies
the architecture:

- ``lossless``: the token ids are equal, decoding plainly and with forced speculation;
- ``failed``: specpass refused the model with a ``SpecPassError`` (unsupported; the reason says why);
- ``skipped``: transformers itself cannot build or run the tiny model (external deps, remote code, ...);
- ``crash``: any other exception inside specpass, and ``mismatch``: different tokens without an error.
  Both are specpass bugs.

Every architecture runs in a worker process with a time limit, so a hang or a segfault costs one row, not the
report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path

log = logging.getLogger("specpass.coverage")

LOSSLESS, FAILED, SKIPPED, CRASH, MISMATCH = "lossless", "failed", "skipped", "crash", "mismatch"
STATUSES = (LOSSLESS, FAILED, SKIPPED, CRASH, MISMATCH)
#: statuses that are specpass bugs (the coverage test fails on them)
BUGS = (CRASH, MISMATCH)

PROMPT_LEN = 6
NEW_TOKENS = 4
MAX_CACHE_LEN = 16
SLIDING_WINDOW = 4  # < PROMPT_LEN + NEW_TOKENS, so the window changes the result
TIMEOUT_S = 120.0
#: the plan every architecture is also decoded with: context lookup, else an early exit after the first layer,
#: drafting whatever it is unsure of too (threshold 0), so that verification both accepts and rejects
FORCED_PLAN_FIELDS = dict(speculate=True, lookup=2, exit_layer=0, max_draft=3, threshold=0.0, adaptive=False)
COMMAND = "specpass coverage"


@dataclasses.dataclass(frozen=True)
class CoverageResult:
    model_type: str
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------------------
N_LAYERS = 2
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB = 256
MAX_POSITIONS = 256

# attribute -> tiny value; applied where the default config has a larger int
# fmt: off
_SHRINK = {
    # width
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "embed_dim": HIDDEN, "word_embed_proj_dim": HIDDEN,
    "embedding_size": HIDDEN, "n_embed": HIDDEN, "embedding_dim": HIDDEN, "attention_hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
    "d_ff": 2 * HIDDEN, "decoder_ffn_dim": 2 * HIDDEN, "encoder_ffn_dim": 2 * HIDDEN, "dim_ff": 2 * HIDDEN,
    "moe_intermediate_size": HIDDEN // 2, "shared_expert_intermediate_size": HIDDEN // 2,
    "expert_intermediate_size": HIDDEN // 2,
    # depth
    "num_hidden_layers": N_LAYERS, "n_layer": N_LAYERS, "n_layers": N_LAYERS, "num_layers": N_LAYERS,
    "decoder_layers": N_LAYERS, "encoder_layers": N_LAYERS, "num_decoder_layers": N_LAYERS, "num_blocks": N_LAYERS,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "global_head_dim": 2 * HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_size": HEAD_DIM, "d_head": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    # MLA (deepseek-style)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # linear attention / SSM
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS, "mamba_d_state": 16,
    "mamba_n_heads": 4, "mamba_d_head": 16, "state_size": 16, "mamba_head_dim": 16, "ssm_state_size": 16,
    "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 8,
    # MoE
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "num_group": 1, "num_expert_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1, "num_shared_experts": 1, "moe_k": 2,
    # hybrids: an attention layer and a MoE layer within two layers
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    # vocab and positions
    "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "max_position_embeddings": MAX_POSITIONS, "n_positions": MAX_POSITIONS, "max_seq_len": MAX_POSITIONS,
    "n_ctx": MAX_POSITIONS, "context_length": MAX_POSITIONS,
    # misc per-model widths and windows
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "sliding_window": SLIDING_WINDOW,
    "window_size": SLIDING_WINDOW, "attention_chunk_size": SLIDING_WINDOW, "num_memory_blocks": 2,
    "global_attn_every_n_layers": 2, "hidden_size_global": HIDDEN, "encoder_hash_byte_group_vocab": 2 * VOCAB,
}
# attribute -> tiny value where the default config leaves it None but the modeling code needs a number
_FILL_NONE = {
    "head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS, "num_experts_per_tok": 2, "n_routed_experts": 4,
    "n_shared_experts": 1,
}
# fmt: on
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# lists of layer indices (rather than one entry per layer)
_LAYER_INDEX_LISTS = ("full_attn_idxs", "mlp_only_layers", "attn_layer_indices", "attn_layer_idx")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrink_dict(d: dict) -> dict:
    """Shrink one config dict (recursing into sub-config dicts); returns a new dict."""
    original, d = d, dict(d)
    old_layers = next((d[k] for k in _LAYER_COUNT_KEYS if _is_int(d.get(k)) and d[k] > 0), None)
    shares_kv = _is_int(d.get("num_kv_shared_layers")) and d["num_kv_shared_layers"] > 0
    multi_head = _is_int(d.get("num_key_value_heads")) and d["num_key_value_heads"] == d.get("num_attention_heads")
    for key, value in list(d.items()):
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            d[key] = _shrink_dict(value)
        elif key in _SHRINK and _is_int(value) and value > _SHRINK[key]:
            d[key] = _SHRINK[key]
        elif key in _FILL_NONE and value is None:
            d[key] = _FILL_NONE[key]
    if multi_head:  # some configs allow no grouped-query attention
        d["num_key_value_heads"] = d["num_attention_heads"]
    _make_consistent(d)
    new_layers = next((d[k] for k in _LAYER_COUNT_KEYS if _is_int(d.get(k)) and d[k] > 0), None)
    if old_layers and new_layers and new_layers < old_layers:
        keep = _layers_to_keep(d.get("layer_types"), old_layers, new_layers)
        if shares_kv and isinstance(d.get("layer_types"), list):
            # Gemma 3n: the last layers reuse the KV of earlier layers of their kind, so keep that feature with
            # twice the layers: [one of each kind] + [the same kinds again, sharing].
            keep = keep + [old_layers - len(keep) + i for i in range(len(keep))]
            kinds = [d["layer_types"][i] for i in keep[: len(keep) // 2]]
            d["layer_types"] = list(d["layer_types"])
            for j, i in enumerate(keep[len(keep) // 2 :]):
                d["layer_types"][i] = kinds[j]
            d["num_kv_shared_layers"] = len(keep) // 2
            for k in _LAYER_COUNT_KEYS:
                if _is_int(d.get(k)) and d[k] == new_layers:
                    d[k] = len(keep)
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_layers and key not in _LAYER_INDEX_LISTS:
                d[key] = [value[i] for i in keep]
            elif key in _LAYER_INDEX_LISTS and isinstance(value, list):
                d[key] = [keep.index(i) for i in value if i in keep]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                # per-layer overrides keyed by layer index: keep the kept layers', scaled like the base sizes
                d[key] = {
                    type(k)(keep.index(int(k))): _scale_overrides(v, original, d) if isinstance(v, dict) else v
                    for k, v in value.items()
                    if int(k) in keep
                }
    # Token ids must lie inside the shrunk vocabulary.
    vocab = d.get("vocab_size")
    if _is_int(vocab):
        for key, value in list(d.items()):
            if key.endswith(("_token_id", "_token_index", "_token_ids")):
                if _is_int(value) and value >= vocab:
                    d[key] = vocab - 1 - (sum(map(ord, key)) % 8)
                elif isinstance(value, list):
                    d[key] = [v if not _is_int(v) or v < vocab else vocab - 1 - (i % 8) for i, v in enumerate(value)]
    return d


def _scale_overrides(overrides: dict, original: dict, shrunk: dict) -> dict:
    """A layer's size overrides, scaled by the factor its base size shrank (512 over a base 256 -> 2x base)."""
    out = dict(overrides)
    for key, value in overrides.items():
        base, new = original.get(key), shrunk.get(key)
        if _is_int(value) and _is_int(base) and _is_int(new) and base > 0:
            out[key] = max(1, value * new // base)
    return out


def _make_consistent(d: dict) -> None:
    """Re-establish the relations between sizes that configs validate (after shrinking them independently)."""
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    kv = d.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        d["num_key_value_heads"] = 1
    if _is_int(d.get("qk_rope_head_dim")):
        # MLA: rotary embeddings cover the rope part of the query/key head only.
        if "head_dim" in d:
            d["head_dim"] = d["qk_rope_head_dim"]
        if _is_int(d.get("qk_nope_head_dim")) and "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    if _is_int(d.get("d_head")) and _is_int(d.get("d_model")) and _is_int(d.get("n_head")):
        d["d_head"] = d["d_model"] // d["n_head"]
    # Mamba mixers: heads * head_dim == expand * hidden.
    if _is_int(hidden):
        for heads_key, dim_key, expand_key in (
            ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
            ("num_heads", "head_dim", "expand"),
        ):
            n, dim, expand = d.get(heads_key), d.get(dim_key), d.get(expand_key)
            if _is_int(n) and _is_int(dim) and isinstance(expand, (int, float)) and not isinstance(expand, bool):
                d[dim_key] = max(1, int(expand * hidden) // n)
                for width_key in ("mamba_intermediate_size", "mamba_d_ssm"):
                    if _is_int(d.get(width_key)):
                        d[width_key] = d[heads_key] * d[dim_key]
    if isinstance(d.get("axial_pos_embds_dim"), (list, tuple)) and _is_int(hidden):
        d["axial_pos_embds_dim"] = [hidden // 2, hidden - hidden // 2]
    head_dim = d.get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) else None)
    for params in _rope_dicts(d.get("rope_parameters") or d.get("rope_scaling")):
        section = params.get("mrope_section")
        if isinstance(section, list) and head_dim:
            params["mrope_section"] = _rescale(section, head_dim // 2)
    if d.get("is_decoder") is False and not d.get("is_encoder_decoder"):
        # BERT-style models are causal LMs only as decoders (HF warns otherwise).
        d["is_decoder"] = True


def _rope_dicts(rope) -> Iterable[dict]:
    if isinstance(rope, dict):
        if any(isinstance(v, dict) for v in rope.values()):
            for v in rope.values():
                if isinstance(v, dict):
                    yield v
        else:
            yield rope


def _rescale(parts: list[int], total: int) -> list[int]:
    s = sum(parts)
    out = [max(1, p * total // s) for p in parts]
    out[0] += total - sum(out)
    return out


def _layers_to_keep(layer_types, old: int, new: int) -> list[int]:
    """Layer indices to keep: the first layer of every distinct kind, then the first others, in order."""
    keep: list[int] = []
    if isinstance(layer_types, list) and len(layer_types) == old:
        seen = set()
        for i, kind in enumerate(layer_types):
            if kind not in seen and len(keep) < new:
                seen.add(kind)
                keep.append(i)
    for i in range(old):
        if len(keep) >= new:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def tiny_config(model_type: str):
    """The default config of ``model_type``, shrunk to a model of a few hundred thousand parameters."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    d = _shrink_dict(config.to_dict())
    d.pop("transformers_version", None)
    tiny = type(config).from_dict(d)
    tiny.use_cache = True
    return tiny


# --------------------------------------------------------------------------------------------------------
# One architecture
# --------------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    """'Type: message', the message's first line (and the next one where the first only introduces it)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    out = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return out if len(out) <= 240 else out[:237] + "..."


def build_tiny_model(model_type: str, **overrides):
    """A tiny random-init fp32 model of ``model_type`` in eval mode (raises whatever transformers raises);
    ``overrides`` are set on its shrunk config."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Plain greedy decoding on both sides: a default config's logits processors (forced EOS, bad words, ...) are
    # generate() settings, not the architecture under test.
    model.generation_config = GenerationConfig()
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(config.languages[0])  # X-MOD needs one
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
        return _first_line(e)
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
        return result(SKIPPED, f"the tiny config is invalid for this architecture: {_first_line(e)}")
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
        return result(SKIPPED, f"transformers' own generate fails on the tiny model: {_first_line(e)}")
    try:
        spec_model = optimize(model, plan=forced_plan, speculate=True, backend="eager", max_cache_len=MAX_CACHE_LEN)
        got = spec_model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False, speculate=False)
        speculated = spec_model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    except SpecPassError as e:
        return result(FAILED, " ".join(str(e).split())[:400])
    except Exception as e:  # noqa: BLE001 - anything else escaping specpass is a bug: report it as a crash
        log.debug("crash on %s:\n%s", model_type, traceback.format_exc())
        return result(CRASH, _first_line(e))
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


# --------------------------------------------------------------------------------------------------------
# Many architectures, each in a worker process
# --------------------------------------------------------------------------------------------------------
def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieter output is a nicety
        pass


def _worker(conn: Connection, threads: int) -> None:
    """Worker process: receive model types, send back CoverageResult dicts, until None arrives."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    # Modeling code prints; the report is the only output (a crash still shows as the worker's exit code).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import torch

    torch.set_num_threads(threads)
    _quiet()
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        try:
            res = check_architecture(model_type)
        except BaseException as e:  # noqa: BLE001 - check_architecture classifies; this is a last resort
            res = CoverageResult(model_type, CRASH, f"coverage harness: {_first_line(e)}")
        conn.send(res.to_json())


class _Slot:
    """One worker process and the architecture it is working on."""

    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.task: str | None = None
        self.started = 0.0

    def give(self, model_type: str) -> None:
        self.task, self.started = model_type, time.monotonic()
        self.conn.send(model_type)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_architectures(
    model_types: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = TIMEOUT_S,
    on_result: Callable[[CoverageResult], None] | None = None,
) -> list[CoverageResult]:
    """check_architecture for each model type in ``workers`` processes; a hang or crash costs one result."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(model_types)
    results: dict[str, CoverageResult] = {}
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    slots = [_Slot(ctx, threads) for _ in range(max(1, min(workers, len(pending))))]

    def finish(slot: _Slot, res: CoverageResult) -> None:
        results[res.model_type] = res
        slot.task = None
        if on_result is not None:
            on_result(res)

    try:
        for slot in slots:
            if pending:
                slot.give(pending.pop(0))
        while any(s.task is not None for s in slots):
            busy = [s for s in slots if s.task is not None]
            deadline = min(s.started + timeout_s for s in busy)
            ready = wait(
                [s.conn for s in busy] + [s.proc.sentinel for s in busy], max(0.0, deadline - time.monotonic())
            )
            for i, slot in enumerate(slots):
                if slot.task is None:
                    continue
                task = slot.task
                if slot.conn in ready or slot.conn.poll():
                    try:
                        finish(slot, CoverageResult(**slot.conn.recv()))
                    except (EOFError, OSError):
                        pass
                if slot.task is None:
                    pass
                elif not slot.proc.is_alive():
                    code = slot.proc.exitcode
                    finish(slot, CoverageResult(task, CRASH, f"worker process died (exit code {code})"))
                    slot.stop()
                    slots[i] = slot = _Slot(ctx, threads)
                elif time.monotonic() - slot.started > timeout_s:
                    finish(slot, CoverageResult(task, CRASH, f"timed out after {timeout_s:.0f}s"))
                    slot.proc.kill()
                    slot.stop()
                    slots[i] = slot = _Slot(ctx, threads)
                if slot.task is None and pending:
                    slot.give(pending.pop(0))
    finally:
        for slot in slots:
            slot.stop()
    return [results[m] for m in model_types if m in results]


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------
def summary_counts(results: Iterable[CoverageResult]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


#: (phrase in a reason, what it means) for the summary of why architectures are not lossless
_CAUSES = (
    (
        "unsupported attention layer types",
        "sparse attention over keys the runtime cache does not hold (indexed, compressed)",
    ),
    ("never reads position_ids", "positions derived from the cache length, not position_ids"),
    ("does not reproduce the model", "the captured graph computes something else than the model's forward"),
    ("is not causal", "not causal (bidirectional attention)"),
    ("writes no keys/values", "no KV-cache support"),
    ("takes no past_key_values", "no KV-cache support"),
    ("uses cache of its own", "a cache class of the model's own"),
    ("torch.export failed", "torch.export fails"),
    ("default config", "transformers cannot build its own default config"),
    ("own generate fails", "transformers' generate fails on the tiny model"),
    ("disagrees with the model's own forward", "transformers' generate disagrees with its own forward"),
    ("tiny config is invalid", "the tiny config made here is invalid for the architecture"),
)


def _cause(reason: str) -> str:
    return next((label for phrase, label in _CAUSES if phrase in reason), "other")


def render_markdown(results: Sequence[CoverageResult], versions: str | None = None) -> str:
    """docs/coverage.md: what was checked, counts, causes, and one row per architecture."""
    counts = summary_counts(results)
    lines = [
        "# Architecture coverage",
        "",
        f"Generated by `{COMMAND}` ({versions or _versions()}); do not edit by hand.",
        f"`{COMMAND} --only ARCH...` updates some rows; `tests/test_coverage_report.py` checks that the lossless",
        "rows still hold.",
        "",
        "Every `model_type` in transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built as a tiny random-init",
        f"fp32 model (its default config shrunk to {N_LAYERS} layers, hidden size {HIDDEN}, vocabulary {VOCAB},",
        f"sliding window {SLIDING_WINDOW}), then {NEW_TOKENS} tokens are greedy-decoded after a {PROMPT_LEN}-token prompt",
        'by `specpass.optimize(model, backend="eager")`, once plainly and once with forced speculation (context',
        "lookup of 2 tokens, else an early exit after layer 0 drafting 3 tokens at any confidence), and by HF",
        "`generate(do_sample=False)` (plain greedy on both sides: the config's logits processors such as a forced",
        "EOS are switched off). Every capture also checks itself against the model's own forward, so a refusal",
        "names the feature that is not supported.",
        "",
        "- **lossless**: the same token ids.",
        "- **failed**: specpass refuses the model with a `SpecPassError`; the reason says why.",
        "- **skipped**: nothing to compare against: transformers cannot build or run the tiny model (or its",
        "  generate disagrees with its own forward), or the shrunk config is invalid for the architecture.",
        "- **crash** / **mismatch**: an exception other than `SpecPassError`, or different tokens: a specpass bug.",
        "",
        "| status | count |",
        "|---|---|",
    ]
    lines += [f"| {s} | {counts[s]} |" for s in STATUSES]
    lines += [f"| total | {sum(counts.values())} |", ""]
    causes: dict[tuple[str, str], int] = {}
    for r in results:
        if r.status != LOSSLESS:
            key = (r.status, _cause(r.reason))
            causes[key] = causes.get(key, 0) + 1
    if causes:
        lines += ["| status | cause | count |", "|---|---|---|"]
        for (status, cause), n in sorted(causes.items(), key=lambda kv: (STATUSES.index(kv[0][0]), -kv[1])):
            lines.append(f"| {status} | {cause} | {n} |")
        lines.append("")
    lines += ["| architecture | status | reason |", "|---|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.model_type}` | {r.status} | {reason} |")
    return "\n".join(lines) + "\n"


def parse_markdown(text: str) -> dict[str, tuple[str, str]]:
    """The rows of a coverage report: model_type -> (status, reason)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) >= 2:
                reason = cells[2].replace("\\|", "|") if len(cells) > 2 else ""
                rows[cells[0].strip("`")] = (cells[1], reason)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="docs/coverage.md", help="markdown report to write (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--only", nargs="+", metavar="ARCH", default=None, help="check only these model types")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help="seconds per architecture before it counts as a crash"
    )


def run_coverage(args: argparse.Namespace) -> int:
    """Check the architectures, write the report(s); exit 1 if any result is a specpass bug (crash/mismatch)."""
    from specpass.errors import SpecPassError
    from specpass.progress import progress_bar

    known = all_model_types()
    only = getattr(args, "only", None)
    if only:
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise SpecPassError(f"unknown model types {unknown}; see MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        model_types = [m for m in known if m in set(only)]
    else:
        model_types = known
    bar = progress_bar(total=len(model_types), desc="coverage", unit="arch")

    def show(res: CoverageResult) -> None:
        bar.set_postfix_str(f"{res.model_type}: {res.status}")
        bar.update(1)

    t0 = time.perf_counter()
    try:
        results = run_architectures(
            model_types,
            workers=getattr(args, "workers", 2),
            timeout_s=getattr(args, "timeout", TIMEOUT_S),
            on_result=show,
        )
    finally:
        bar.close()
    counts = summary_counts(results)
    output = getattr(args, "output", None)
    if output:
        if only and Path(output).exists():
            # A partial run updates its rows and keeps the others.
            merged = {m: CoverageResult(m, s, r) for m, (s, r) in parse_markdown(Path(output).read_text()).items()}
            merged.update({r.model_type: r for r in results})
            report = [merged[m] for m in sorted(merged)]
        else:
            report = results
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(render_markdown(report))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    print(", ".join(f"{counts[s]} {s}" for s in STATUSES) + f" ({time.perf_counter() - t0:.0f}s)")
    for r in results:
        if r.status in BUGS:
            print(f"  {r.status}: {r.model_type}: {r.reason}")
    return 1 if any(r.status in BUGS for r in results) else 0


if __name__ == "__main__":  # python -m specpass.coverage: the same as `specpass coverage`
    import sys

    _parser = argparse.ArgumentParser(prog=COMMAND)
    add_arguments(_parser)
    sys.exit(run_coverage(_parser.parse_args()))
