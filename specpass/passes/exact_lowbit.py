"""Store weights that lie on a quantization grid as their blocks, bit for bit (GGUF's block formats, Gerganov
et al., ggml; recovered, not re-quantized).

A model loaded from a GGUF file holds float32 weights that are each ``scale * q + shift`` of a block: Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, Q4_K/Q5_K (affine blocks of 32) and Q6_K (symmetric blocks of 16). For every linear
layer's (and the embedding's) fp32 CPU weight, this pass recovers each block's scale and shift from the values
themselves and keeps a block only if rebuilding every one of its values gives the fp32 weight **bit for bit**;
blocks that do not (or a matrix where fewer than half do) stay fp32. The matched matrix is read as 4-bit or
8-bit codes, 3 to 5x fewer bytes, by ``torch.ops.specpass.lowbit_linear`` / ``lowbit_embedding``
(specpass/kernels/lowbit.cpp), which rebuild the exact weights before multiplying.

So the pass never changes a weight: it changes how the same numbers are stored. Each rebuilt value is
``q * scale + shift`` with, where the shift is not zero, ``q * scale`` exact, so it is the same whether a
compiler fuses the multiply-add or not; tests rebuild every matched matrix and compare its bits.

``linear(x, W[, b])`` becomes ``lowbit_linear(x, blocks...)[ + b]`` and ``embedding(W, ids)`` becomes
``lowbit_embedding(ids, blocks...)``; the blocks are parameters of the program (an engine stores them instead
of the fp32 weight). Linear layers that read the same input with the same storage (q/k/v, gate/up) become one
call over their blocks stacked by rows, whose output is sliced back::

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
    ->  qkv = lowbit_linear(x, blocks of [Wq; Wk; Wv]); q = qkv[..., :Nq]; k = ...; v = ...

(one call, one start of the threads and one pass over x instead of three: a decode step of the default model
3-7% faster on the 2-core Zen 3 of 2026-12-03, docs/benchmarks.md).

The kernel is used only where it is faster on this CPU (``kernels/choice.py``: each kind of call timed against
the fp32 product it replaces, per program regime: prefill, or a few tokens; ``$SPECPASS_LOWBIT_CHOICE=always``
skips the timing). The recovery runs once per weight tensor and compile (``packing``) and is reported per
matrix, by the model's parameter name, in ``gm.meta["specpass"]["exact_lowbit"]``; the timings in
``["lowbit_choices"]`` and the calls in ``["lowbit_calls"]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections import defaultdict

import torch

from specpass.hugepages import backed
from specpass.kernels import BLOCK_PARTS, build_error, choice
from specpass.passes.manager import PassResult, attr_of, tag

log = logging.getLogger("specpass.passes")

_aten = torch.ops.aten
_LINEAR = _aten.linear.default
_EMBEDDING = _aten.embedding.default
_LOWBIT_LINEAR = torch.ops.specpass.lowbit_linear.default
_LOWBIT_EMBEDDING = torch.ops.specpass.lowbit_embedding.default

#: a matrix is stored as blocks when at least this share of its blocks is reproduced exactly
MIN_MATCHED = 0.5
_SAMPLE = 2048  # blocks tried first, to skip a storage that cannot match
_WRAPPER = "model."  # hf_cache.CaptureWrapper holds the HF model as .model: reports use the model's own names

#: (storage bits, block size, signed codes, candidate block formats), most compact first. A candidate is
#: ("affine", levels): shift = the block's minimum (the value of code 0), scale = (max - min) / levels rounded to
#: 17 significant bits (an fp16 scale, or K-quants' fp16 x 6-bit sub-scale), codes 0..levels; or
#: ("symmetric", k): scale = the value of largest magnitude / k, for k and -k (the scale's sign decides the
#: sign of a zero weight), codes in the format's signed range, no shift. The first candidate that reproduces a
#: block keeps it, so the order also names the format (a Q5_0 block is a Q8_0 block with codes times 8).
#: 4-bit codes are signed (Q4_0: stored + 8, no shift) or unsigned (Q4_1, Q4_K: with a shift); int8 holds both.
_STORAGES = (
    (4, 32, True, (("Q4_0", "symmetric", 8), ("Q4_0", "symmetric", 7))),
    (4, 32, False, (("Q4_1", "affine", 15), ("Q4_1", "affine", 14))),
    (
        8,
        32,
        True,
        (
            ("Q8_0", "symmetric", 127),
            ("Q5_0", "symmetric", 16),
            ("Q5_0", "symmetric", 15),
            ("Q8_0", "symmetric", 128),
            ("Q5_1", "affine", 31),
            ("Q5_1", "affine", 30),
        ),
    ),
    (8, 16, True, (("Q6_K", "symmetric", 32), ("Q6_K", "symmetric", 31))),
)
_SIGNED_RANGE = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q6_K": (-32, 31), "Q8_0": (-128, 127)}
#: affine formats whose scales or minimums are not all fp16 values are K-quants (an fp16 x 6-bit product)
_K_QUANT = {"Q4_1": "Q4_K", "Q5_1": "Q5_K"}
_fallback_said = False  # the kernels could not be built, and a warning said so
_packs: contextvars.ContextVar[dict | None] = contextvars.ContextVar("specpass_packs", default=None)
_CHUNK = 1 << 18  # blocks searched at a time (bounds the fp64 temporaries of a 170M-weight embedding)


@dataclasses.dataclass
class Blocks:
    """A weight matrix as blocks: ``w[n, b*block + i] = codes * scale[n, b] + shift[n, b]``, bit for bit."""

    format: str  # the GGUF format most of its blocks match (Q4_1, Q8_0, ...)
    bits: int  # 4: two codes a byte; 8: int8 codes
    block: int
    q: torch.Tensor  # uint8 (N, K/2) or int8 (N, K)
    scale: torch.Tensor  # fp32 (N, K/block)
    shift: torch.Tensor  # fp32 (N, K/block), or empty when every shift is 0 (then 4-bit codes are signed: byte - 8)
    exc_ids: torch.Tensor  # int64 flat ids (n * K/block + b) of the blocks kept as fp32, sorted
    exc_values: torch.Tensor  # fp32 (len(exc_ids), block)
    shape: tuple[int, int]
    in_huge_pages: bool = False  # its tensors moved by _in_huge_pages

    @property
    def n_blocks(self) -> int:
        return self.scale.numel()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale, self.shift, self.exc_ids, self.exc_values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def summary(self) -> dict:
        return {
            "format": self.format,
            "shape": list(self.shape),
            "blocks": self.n_blocks,
            "fp32_blocks": int(self.exc_ids.numel()),
            "bytes": self.nbytes,
        }


def exact_lowbit(gm: torch.fx.GraphModule, structure=None, cfg=None) -> PassResult:
    """Read every fp32 CPU linear / embedding weight that lies on a block grid through the low-bit kernels, where
    they are faster."""
    meta = gm.meta.setdefault("specpass", {})
    report = meta.setdefault("exact_lowbit", {})
    matches = []  # (node, weight node, blocks), graph order
    for node in list(gm.graph.nodes):
        weight_node = _weight_of(node)
        if weight_node is None:
            continue
        blocks = pack(attr_of(gm, weight_node.target))
        if blocks is not None:
            matches.append((node, weight_node, blocks))
    if matches and not choice.fixed() and not _kernels_here():  # a snapshot's given choices need no kernel
        return PassResult(gm, False, 0)
    calls = [(members, _stacked([b for _, _, b in members])) for members in _one_call_each(matches)]
    if choice.mode() == "measure" or choice.fixed():  # a snapshot's given choices win over the mode
        calls = _faster_on_this_cpu(gm, calls, meta.setdefault("lowbit_choices", {}))
    records = meta.setdefault("lowbit_calls", [])
    for members, blocks in calls:
        records.append(_rewrite(gm, members, blocks))
        for _, weight_node, b in members:
            report[weight_node.target.removeprefix(_WRAPPER)] = b.summary()
    return PassResult(gm, bool(calls), sum(len(m) for m, _ in calls))


def _kernels_here() -> bool:
    """Whether the kernels are built and loaded (on first use); where they cannot be built (no C++ compiler, a
    failed build), the weights stay fp32, said once per process."""
    global _fallback_said
    error = build_error()
    if error is not None and not _fallback_said:
        log.warning("exact_lowbit: weights stay fp32 (lossless, slower): %s", str(error).splitlines()[0])
        _fallback_said = True
    return error is None


def _one_call_each(matches: list) -> list[list]:
    """The matches grouped into calls: linear layers of one input and one storage together, the rest alone."""
    groups: dict[tuple, list] = defaultdict(list)
    for match in matches:
        node, _, b = match
        key = (node.args[0], b.bits, b.block, b.shift.numel() > 0, b.shape[1]) if node.target is _LINEAR else (node,)
        groups[key].append(match)
    return list(groups.values())


def _is_prefill(gm: torch.fx.GraphModule) -> bool:
    """A prefill program keeps only the last position's logits (passes/last_token_logits.py ran before)."""
    return any(h["pass"] == "last_token_logits" for h in gm.meta.get("specpass", {}).get("history", []))


def _faster_on_this_cpu(gm: torch.fx.GraphModule, calls: list, choices: dict) -> list:
    """The calls whose kind the kernel multiplies faster than fp32 here (embeddings always: one row a token)."""
    regime = "prefill" if _is_prefill(gm) else "few_tokens"
    kinds: dict[str, list] = defaultdict(list)
    for members, blocks in calls:
        if members[0][0].target is _LINEAR:
            weights = [attr_of(gm, w.target) for _, w, _ in members]
            call = choice.Call(blocks.tensors(), blocks.block, blocks.bits, weights)
            kinds[choice.kind([call], regime)].append((members, blocks, call))
    slower: set[int] = set()
    for same in kinds.values():
        result = choice.lowbit_faster([c for _, _, c in same], regime)
        choices[result["kind"]] = result
        if not result["lowbit"]:
            slower.update(id(members) for members, _, _ in same)
    return [(members, blocks) for members, blocks in calls if id(members) not in slower]


def _weight_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The fp32 CPU constant weight of a linear or embedding node (None for anything else)."""
    if node.op != "call_function":
        return None
    if node.target is _LINEAR:
        weight, x = node.args[1], node.args[0]
    elif node.target is _EMBEDDING:  # padding_idx, scale_grad_by_freq and sparse only change gradients
        weight, x = node.args[0], node.args[1]
    else:
        return None
    wv, xv = weight.meta.get("val"), x.meta.get("val")
    if (
        weight.op != "get_attr"
        or not isinstance(wv, torch.Tensor)
        or not isinstance(xv, torch.Tensor)
        or wv.dim() != 2
        or wv.dtype != torch.float32
        or wv.device.type != "cpu"
        or wv.shape[1] % 16
    ):
        return None
    if node.target is _LINEAR and xv.dtype != torch.float32:
        return None
    return weight


@contextlib.contextmanager
def packing(cache: dict):
    """Inside the block, ``pack`` keeps what it recovers in ``cache``: one compile's programs share one packing.

    The cache belongs to the compile (programs.SpecModel's), not to the weights: a weight edited in place (through
    ``.data``, which does not bump its version) is packed again by the next compile, and nothing stays attached
    to the user's parameters once the compiled model is gone.
    """
    token = _packs.set(cache)
    try:
        yield
    finally:
        _packs.reset(token)


def pack(weight: torch.Tensor) -> Blocks | None:
    """``weight`` as blocks that reproduce it bit for bit, or None; kept in the ``packing`` cache in effect."""
    cache = _packs.get()
    cached = cache.get(id(weight)) if cache is not None else None
    if cached is not None and cached[0] is weight:
        return cached[1]
    with torch.no_grad():
        blocks = recover_blocks(weight.detach())
    if cache is not None:
        cache[id(weight)] = (weight, blocks)  # the tensor too: its id is not reused while it is held
    if blocks is not None:
        log.debug("exact_lowbit: %s weight %s: %s", blocks.format, tuple(weight.shape), blocks.summary())
    return blocks


def recover_blocks(w: torch.Tensor) -> Blocks | None:
    """Find the most compact block storage that reproduces at least MIN_MATCHED of ``w``'s blocks exactly."""
    n_rows, k = w.shape
    for bits, block, signed, candidates in _STORAGES:
        if k % block:
            continue
        wb = w.reshape(-1, block)
        n_blocks = wb.shape[0]
        if n_blocks > 4 * _SAMPLE:  # a sample of its blocks says whether this storage can reach MIN_MATCHED
            sample = _match(wb[:: n_blocks // _SAMPLE].contiguous(), bits, signed, candidates)
            if sample[3].float().mean().item() < MIN_MATCHED / 2:
                continue
        codes, scale, shift, found, names = _match(wb, bits, signed, candidates)
        if found.float().mean().item() < MIN_MATCHED:
            continue
        misses = (~found).nonzero().squeeze(1)
        codes[misses], scale[misses], shift[misses] = 0, 0.0, -0.0
        fmt = max(names, key=names.get)
        if fmt in _K_QUANT and not (_is_fp16(scale) and _is_fp16(shift)):
            fmt = _K_QUANT[fmt]
        if bits == 4:  # two codes a byte (weight i low, i + 16 high); signed codes are stored + 8
            u8 = (codes + (8 if signed else 0)).to(torch.uint8).reshape(-1, 2, block // 2)
            q = (u8[:, 0] | (u8[:, 1] << 4)).reshape(n_rows, k // 2)
            keep_shift = not signed
        else:
            q = codes.to(torch.int8).reshape(n_rows, k)
            keep_shift = not bool(_negative_zero(shift).all())  # all -0.0: the kernel adds -0.0 without one
        return Blocks(
            format=fmt,
            bits=bits,
            block=block,
            q=q.contiguous(),
            scale=scale.reshape(n_rows, k // block).contiguous(),
            shift=shift.reshape(n_rows, k // block).contiguous() if keep_shift else torch.zeros(0),
            exc_ids=misses.to(torch.int64).contiguous(),
            exc_values=wb[misses].contiguous(),
            shape=(n_rows, k),
        )
    return None


def _match(wb: torch.Tensor, bits: int, signed: bool, candidates):
    """Each block's first reproducing candidate: (codes, scale, shift, found, {format: blocks})."""
    n = wb.shape[0]
    codes = torch.zeros(wb.shape, dtype=torch.int16)
    scale = torch.zeros(n)
    shift = torch.full((n,), -0.0)
    found = torch.zeros(n, dtype=torch.bool)
    names: dict[str, int] = {}
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(n, start + _CHUNK))
        for name, kind, param in _expanded(candidates):
            todo = (~found[part]).nonzero().squeeze(1) + start
            if todo.numel() == 0:
                break
            sub = wb[todo]
            if kind == "affine":
                u, s, m = _affine(sub, param)
            else:
                u, s, m = _symmetric(sub, param, *_SIGNED_RANGE[name])
            ok = _reproduces(sub, u, s, m) & ((u >= lo) & (u <= hi)).all(1)
            hit = todo[ok]
            codes[hit], scale[hit], shift[hit] = u[ok], s[ok], m[ok]
            found[hit] = True
            names[name] = names.get(name, 0) + int(ok.sum())
    return codes, scale, shift, found, names


def _negative_zero(t: torch.Tensor) -> torch.Tensor:
    return (t == 0) & torch.signbit(t)


def _is_fp16(t: torch.Tensor) -> bool:
    return bool((t.half().float() == t).all())


def _expanded(candidates):
    for name, kind, param in candidates:
        yield name, kind, param
        if kind == "symmetric":
            yield name, kind, -param


def _round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp64 values rounded to ``bits`` significant bits, as fp32 (exact: bits <= 24)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits))), exponent - bits).float()


def _affine(wb: torch.Tensor, levels: int):
    """Codes 0..levels with shift = the block's minimum (the value whose code is 0)."""
    lo, hi = wb.min(1).values, wb.max(1).values
    s = _round_bits((hi.double() - lo.double()) / levels, 17)
    step = torch.where(s == 0, torch.ones_like(s), s).double()
    u = torch.round((wb.double() - lo.double()[:, None]) / step[:, None])
    u = torch.where((u >= 0) & (u <= levels), u, torch.zeros_like(u))
    return u.to(torch.int16), s, lo


def _symmetric(wb: torch.Tensor, k: int, qmin: int, qmax: int):
    """Codes qmin..qmax times scale = (value of largest magnitude) / k."""
    top = wb.gather(1, wb.abs().argmax(1, keepdim=True)).squeeze(1)
    s = top / k
    step = torch.where(s == 0, torch.ones_like(s), s).double()
    q = torch.round(wb.double() / step[:, None])
    q = torch.where((q >= qmin) & (q <= qmax), q, torch.full_like(q, 1e9))  # out of range: fails the check
    # -0.0 is the shift that changes nothing: x + (-0.0) is x, a weight of -0.0 (code 0, negative scale) included
    return q.clamp(-129, 128).to(torch.int16), s, torch.full_like(s, -0.0)


def _reproduces(wb: torch.Tensor, u: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per block: every ``u * s + m`` in fp32 has ``wb``'s bits, with ``u * s`` exact where ``m`` is not -0.0.

    Then a fused ``fma(u, s, m)`` gives the same value: with ``u * s`` exact there is one rounding either way, and
    adding -0.0 changes no value, a product that underflows to a signed zero included (+0.0 would turn -0.0 into
    +0.0 after a rounded product, not inside an fma)."""
    uf = u.float()
    prod = uf * s[:, None]
    exact = (prod.double() == uf.double() * s.double()[:, None]) | _negative_zero(m)[:, None]
    value = prod + m[:, None]
    same = value.view(torch.int32) == wb.view(torch.int32)
    return (exact & same).all(1)


def _stacked(parts: list[Blocks]) -> Blocks:
    """One Blocks holding ``parts``' rows in turn (they share bits, block, shift and columns); cached, and each part
    then views its rows of the stack, so the weights are held once. Its tensors lie in huge pages where the system
    has them (hugepages.py): a decode step streams them once."""
    if len(parts) == 1:
        return _in_huge_pages(parts[0])
    key = tuple((id(b.q), b.q.data_ptr()) for b in parts)
    cached = getattr(parts[0].q, "_specpass_stacked", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    nb = parts[0].scale.shape[1]
    offsets = [0]
    for b in parts:
        offsets.append(offsets[-1] + b.shape[0])
    stacked = Blocks(
        format=parts[0].format,
        bits=parts[0].bits,
        block=parts[0].block,
        q=backed(torch.cat([b.q for b in parts])),
        scale=backed(torch.cat([b.scale for b in parts])),
        shift=backed(torch.cat([b.shift for b in parts])) if parts[0].shift.numel() else parts[0].shift,
        exc_ids=torch.cat([b.exc_ids + row * nb for b, row in zip(parts, offsets, strict=False)]),
        exc_values=backed(torch.cat([b.exc_values for b in parts])),
        shape=(offsets[-1], parts[0].shape[1]),
        in_huge_pages=True,
    )
    for b, r0, r1 in zip(parts, offsets, offsets[1:], strict=False):  # the parts' own tensors now view the stack
        b.q, b.scale = stacked.q[r0:r1], stacked.scale[r0:r1]
        if b.shift.numel():
            b.shift = stacked.shift[r0:r1]
    with contextlib.suppress(AttributeError, RuntimeError):  # the next program's lookup finds the views
        parts[0].q._specpass_stacked = (tuple((id(b.q), b.q.data_ptr()) for b in parts), stacked)
    return stacked


def _in_huge_pages(blocks: Blocks) -> Blocks:
    """``blocks`` with its tensors moved into huge pages, once (the object is the packing cache's)."""
    if not blocks.in_huge_pages:
        blocks.q, blocks.scale, blocks.exc_values = backed(blocks.q), backed(blocks.scale), backed(blocks.exc_values)
        blocks.shift = backed(blocks.shift)
        blocks.in_huge_pages = True
    return blocks


def _rewrite(gm: torch.fx.GraphModule, members: list, blocks: Blocks) -> dict:
    """Replace ``members`` (linear or embedding nodes with their weight nodes) by one low-bit call; returns its
    record (parameter names, block, bits, the matrices' shapes)."""
    graph = gm.graph
    first, first_weight, _ = members[0]
    prefix = (
        "specpass_lowbit_" + first_weight.target.replace(".", "_") + (f"_x{len(members)}" if len(members) > 1 else "")
    )
    names = _free_names(gm, prefix, blocks.tensors())
    with graph.inserting_before(first), _fake_mode(first.meta["val"]):
        inputs = []
        for name, t in zip(names, blocks.tensors(), strict=True):
            if not hasattr(gm, name):  # a parameter: bound at load like the weight it replaces, not hashed
                gm.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            attr = graph.get_attr(name)
            attr.meta["val"] = t
            tag(attr, "exact_lowbit", first)
            inputs.append(attr)

        def call(target, args, val, anchor):
            new = graph.call_function(target, args)
            new.meta["val"] = val
            tag(new, "exact_lowbit", anchor)
            return new

        if first.target is _EMBEDDING:
            new = call(_LOWBIT_EMBEDDING, (first.args[1], *inputs, blocks.block, blocks.bits), first.meta["val"], first)
            outputs = [new]
        else:
            val = first.meta["val"]
            val = val.new_empty((*val.shape[:-1], blocks.shape[0]))
            new = call(_LOWBIT_LINEAR, (first.args[0], *inputs, blocks.block, blocks.bits), val, first)
            outputs, start = [], 0
            for node, _, b in members:
                out = new
                if len(members) > 1:  # this member's columns of the stacked output
                    end = start + b.shape[0]
                    out = call(_aten.slice.Tensor, (new, -1, start, end), val[..., start:end], node)
                    start = end
                if len(node.args) > 2 and node.args[2] is not None:  # the bias
                    out = call(_aten.add.Tensor, (out, node.args[2]), node.meta["val"], node)
                outputs.append(out)
    for (node, _, _), out in zip(members, outputs, strict=True):
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return {
        "op": "embedding" if first.target is _EMBEDDING else "linear",
        "params": names,
        # parts without elements (no shift, no exceptions): AOTInductor keeps no constant for them
        "empty": [part for part, t in zip(BLOCK_PARTS, blocks.tensors(), strict=True) if t.numel() == 0],
        "block": blocks.block,
        "bits": blocks.bits,
        "shapes": [list(b.shape) for _, _, b in members],
    }


def _free_names(gm: torch.fx.GraphModule, prefix: str, tensors: tuple) -> list[str]:
    """The parameter names of ``tensors`` on ``gm``: ``<prefix>_<part>``, or with a number after the prefix where
    another matrix's blocks hold those names (two weight names that differ only in "." and "_" give one prefix);
    the same blocks (a tied weight read twice) keep theirs."""
    for n in range(1, 1000):
        names = [f"{prefix}{'' if n == 1 else f'_{n}'}_{part}" for part in BLOCK_PARTS]
        held = [getattr(gm, name, None) for name in names]
        if all(h is None for h in held) or all(
            h is not None and h.shape == t.shape and h.data_ptr() == t.data_ptr()
            for h, t in zip(held, tensors, strict=True)
        ):
            return names
    raise AssertionError(f"no free parameter names for {prefix}")  # pragma: no cover - 999 colliding weights


def _fake_mode(val):
    """The fake mode of the capture's shape values (symbolic shapes propagate only inside it)."""
    mode = getattr(val, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()
