"""Compute each weight's linear layer as ``W @ x.T`` (weight-stationary) with one extra zero column, on the CPU,
where that is faster on this CPU.

No paper: measurements of MKL (docs/benchmarks.md, "The matrix products behind the verify cost" and "The fp32
operand order"). On the 2-core AMD EPYC (Zen 4) of 2026-11-27, ``linear(x, W)`` with x of q = 2 to 8 rows took
MKL's path for a short, wide left operand, 4-8x slower than the same product ordered as ``W @ x.T``; with q = 1
both orders are a matrix-vector product, and two columns of ``W @ x.T`` cost half as much as that one (the
default model's layers plus head: 49 ms for one column, 22 ms for two). On a 2-core Intel Xeon (2026-12-07) the
same rewrite made the default model's fp32 decode step 2.4x slower (56.5 against 23.2 ms). So each shape of
weight is timed in both orders on the machine (``kernels.choice.stationary_faster``, cached per CPU) and
rewritten only where ``W @ x.T`` wins. Decode (one token), verify and draft programs (a few) all live in that
range; prefill does not and keeps ``linear``.

``linear(x, W[, b])`` with ``x`` of shape (..., K) becomes::

    x2 = x.reshape(-1, K)                           # q rows
    xp = cat([x2, zeros(1, K)])                     # q + 1 rows: one token is a matrix product, not a gemv
    y = mm(W, xp.T)[:, :q].T.reshape(..., N)        (+ b)

(A symbolic ``max(q, 2)`` rows instead of ``q + 1`` miscompiled in AOTInductor: a one-token call failed with a
size mismatch in attention.)

Every output element is the same dot product of a row of W with a row of x, so the result differs from
``linear``'s at most by the order of the float additions inside the BLAS kernel (as any two kernels do); the
pad row's products are sliced away. Only fp32 CPU weights are rewritten: on a GPU cuBLAS picks its own kernel
for either order, and a bf16 ``mm`` on the CPU rounds differently enough from HF's bf16 ``linear`` to flip more
of a random tiny model's near-ties (tests/test_dtypes.py saw 3 of 6 prompts), with no speed measured for it.
What was measured is kept in ``gm.meta["specpass"]["operand_order"]`` (kind -> times and choice).
"""

from __future__ import annotations

import contextlib

import torch

from specpass.kernels import choice
from specpass.passes.manager import PassResult, attr_of, tag

_LINEAR = torch.ops.aten.linear.default
_aten = torch.ops.aten


def linear_operand_order(gm: torch.fx.GraphModule, structure=None, cfg=None) -> PassResult:
    """Rewrite every ``aten.linear`` whose weight is a 2-D fp32 CPU constant into a weight-stationary ``mm``, for
    the shapes of weight where that is faster here."""
    linears = [n for n in gm.graph.nodes if _is_cpu_weight_linear(n)]
    by_shape: dict[tuple, list[torch.fx.Node]] = {}
    for node in linears:
        by_shape.setdefault(tuple(node.args[1].meta["val"].shape), []).append(node)
    chosen = gm.meta.setdefault("specpass", {}).setdefault("operand_order", {})
    stationary = set()
    for nodes in by_shape.values():
        weights = {id(w): w for w in (attr_of(gm, n.args[1].target) for n in nodes)}  # a tied weight once
        result = choice.stationary_faster(list(weights.values()))
        chosen[result["kind"]] = result
        if result["stationary"]:
            stationary.update(nodes)
    matches = [n for n in linears if n in stationary]
    columns: dict[torch.fx.Node, tuple] = {}  # q, k and v projections share one padded, transposed input
    for node in matches:  # graph order: an input's first linear creates its columns before the others use them
        _rewrite(gm, node, columns)
    return PassResult(gm, bool(matches), len(matches))


def _is_cpu_weight_linear(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not _LINEAR:
        return False
    x, w = node.args[0], node.args[1]
    xv, wv = x.meta.get("val"), w.meta.get("val")
    return (
        w.op == "get_attr"
        and isinstance(wv, torch.Tensor)
        and isinstance(xv, torch.Tensor)
        and wv.dim() == 2
        and wv.device.type == "cpu"
        and wv.dtype == torch.float32
        and xv.dim() >= 2
    )


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, columns: dict) -> None:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    xv, wv = x.meta["val"], w.meta["val"]
    n_out, k = wv.shape
    lead = list(xv.shape[:-1])
    graph = gm.graph

    def call(target, args, val):
        new = graph.call_function(target, args)
        new.meta["val"] = val
        tag(new, "linear_operand_order", node)
        return new

    with graph.inserting_before(node), _fake_mode(xv):
        if x not in columns:
            x2v = xv.reshape(-1, k)
            x2 = call(_aten.reshape.default, (x, [-1, k]), x2v)
            q = call(_aten.sym_size.int, (x2, 0), x2v.shape[0])
            zv = x2v.new_zeros([1, k])
            zero = call(_aten.new_zeros.default, (x2, [1, k]), zv)
            xpv = torch.cat([x2v, zv])
            xp = call(_aten.cat.default, ([x2, zero],), xpv)
            columns[x] = (q, call(_aten.t.default, (xp,), xpv.t()), _sizes(x, lead, call))
        q, xt, sizes = columns[x]
        yv = xt.meta["val"].new_empty((n_out, xt.meta["val"].shape[1]))  # the weight's val may be a real tensor
        y = call(_aten.mm.default, (w, xt), yv)
        ysv = yv[:, : q.meta["val"]]
        ys = call(_aten.slice.Tensor, (y, 1, 0, q), ysv)
        ytv = ysv.t()
        yt = call(_aten.t.default, (ys,), ytv)
        outv = ytv.reshape([*lead, n_out])
        out = call(_aten.reshape.default, (yt, [*sizes, n_out]), outv)
        if bias is not None:
            out = call(_aten.add.Tensor, (out, bias), outv)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _fake_mode(val: torch.Tensor):
    """The fake mode of the capture's shape values (symbolic shapes propagate only inside it)."""
    mode = getattr(val, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()


def _sizes(x, lead, call) -> list:
    """The leading sizes of ``x`` for a reshape: ints as they are, symbolic ones read from ``x`` in the graph."""
    sizes = []
    for dim, size in enumerate(lead):
        sizes.append(size if isinstance(size, int) else call(_aten.sym_size.int, (x, dim), size))
    return sizes
