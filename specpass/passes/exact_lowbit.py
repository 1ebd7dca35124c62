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
of the fp32 weight). The recovery runs once per weight tensor (cached on it) and is reported per matrix, by the
model's parameter name, in ``gm.meta["specpass"]["exact_lowbit"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from specpass.kernels import load_kernels
from specpass.passes.manager import PassResult, attr_of, tag

log = logging.getLogger("specpass.passes")

_aten = torch.ops.aten
_LINEAR = _aten.linear.default
_EMBEDDING = _aten.embedding.default

#: a matrix is stored as blocks when at least this share of its blocks is reproduced exactly
MIN_MATCHED = 0.5
_SAMPLE = 2048  # blocks tried first, to skip a storage that cannot match
_WRAPPER = "model."  # capture.CaptureWrapper holds the HF model as .model: reports use the model's own names

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
    """Read every fp32 CPU linear / embedding weight that lies on a block grid through the low-bit kernels."""
    report = gm.meta.setdefault("specpass", {}).setdefault("exact_lowbit", {})
    n = 0
    for node in list(gm.graph.nodes):
        weight_node = _weight_of(node)
        if weight_node is None:
            continue
        weight = attr_of(gm, weight_node.target)
        blocks = pack(weight)
        if blocks is None:
            continue
        load_kernels()  # built on first use; a SpecPassError (no compiler) names exact_lowbit=False
        _rewrite(gm, node, weight_node, blocks)
        report[weight_node.target.removeprefix(_WRAPPER)] = blocks.summary()
        n += 1
    return PassResult(gm, n > 0, n)


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


def pack(weight: torch.Tensor) -> Blocks | None:
    """``weight`` as blocks that reproduce it bit for bit, or None; cached on the tensor (same object, same
    version: every program of a model shares one packing)."""
    cached = getattr(weight, "_specpass_lowbit", None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    with torch.no_grad():
        blocks = recover_blocks(weight.detach())
    with contextlib.suppress(AttributeError, RuntimeError):  # a tensor that takes no attributes: no cache
        weight._specpass_lowbit = (weight._version, blocks)
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
            keep_shift = bool(shift.any())  # all +-0.0: the kernel adds -0.0, which changes no weight
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
    """Per block: every ``u * s + m`` in fp32 has ``wb``'s bits, with ``u * s`` exact where ``m`` is not 0."""
    uf = u.float()
    prod = uf * s[:, None]
    exact = (prod.double() == uf.double() * s.double()[:, None]) | (m == 0)[:, None]  # +-0: adds nothing
    value = prod + m[:, None]
    same = value.view(torch.int32) == wb.view(torch.int32)
    return (exact & same).all(1)


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, weight_node: torch.fx.Node, blocks: Blocks) -> None:
    graph = gm.graph
    prefix = "specpass_lowbit_" + weight_node.target.replace(".", "_")
    with graph.inserting_before(node):
        inputs = []
        for part, t in zip(("q", "scale", "shift", "exc_ids", "exc_values"), blocks.tensors(), strict=True):
            name = f"{prefix}_{part}"
            if not hasattr(gm, name):  # a parameter: bound at load like the weight it replaces, not hashed
                gm.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            attr = graph.get_attr(name)
            attr.meta["val"] = t
            tag(attr, "exact_lowbit", node)
            inputs.append(attr)

        def call(target, args):
            new = graph.call_function(target, args)
            new.meta["val"] = node.meta["val"]
            tag(new, "exact_lowbit", node)
            return new

        if node.target is _LINEAR:
            new = call(torch.ops.specpass.lowbit_linear.default, (node.args[0], *inputs, blocks.block, blocks.bits))
            if len(node.args) > 2 and node.args[2] is not None:  # the bias
                new = call(_aten.add.Tensor, (new, node.args[2]))
        else:
            new = call(torch.ops.specpass.lowbit_embedding.default, (node.args[1], *inputs, blocks.block, blocks.bits))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
