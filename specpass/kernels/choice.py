"""Which multiplies a model's matrices faster on this CPU: the low-bit kernel or the fp32 product it replaces, and
in fp32, which operand order.

Measured, not assumed: the kernel reads 3-5x fewer bytes but does more work per weight, and which wins depends on
the CPU (the same source was 5x faster than fp32 on an AVX-512 Zen 4 and 3.4x slower on an AVX2 Zen 3 before it
had an AVX2 path of its own). Each *kind* of call (its storage format and the shapes of the matrices it reads) is
timed once per CPU, kernel build and thread count, over every matrix of that kind in the model in turn, so that
the weights stream from memory as they do in a decode step instead of sitting in cache; the answer is cached in
``<cache>/kernels/choices.json``.

Two regimes, because one program runs one of them: ``few_tokens`` (decode, verify and draft programs: 1-4
tokens, against fp32 in the faster of the two operand orders below) and ``prefill`` (a 128-token prompt tile,
against fp32 ``linear``).

The fp32 order (``stationary_faster``): ``linear(x, W)`` or the weight-stationary ``W @ x.T`` of
passes/linear_operand_order.py, for a few tokens. MKL made the second 2-8x faster on a Zen 4 and 2.4x slower on
an Intel Xeon (the default model's fp32 decode step 56.5 against 23.2 ms: docs/benchmarks.md), so it is timed
per shape of weight, like the kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import re
import time

import torch

from specpass import machine
from specpass.cache import cache_root, write_atomic
from specpass.errors import SpecPassError

log = logging.getLogger("specpass.kernels")

#: tokens per call timed in each regime
REGIMES = {"few_tokens": (1, 2, 3, 4), "prefill": (128,)}
#: more tokens than this are a prefill: lowbit.cpp's kPrefillTokens, and F.linear in the fp32 programs
PREFILL_TOKENS = 16
#: how the low-bit/fp32 choice is made: "measure" (time both, keep the faster) or "always" (the kernel wherever
#: a matrix lies on a grid). ``$SPECPASS_LOWBIT_CHOICE`` sets it for a process (the test suite uses "always", so
#: that its graphs do not depend on the machine), ``optimize(..., exact_lowbit="always")`` for one compile.
MODES = ("measure", "always")
_REPEATS = 5
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("specpass_lowbit_choice", default=None)
#: kind of call -> kernel (True) or fp32, decided elsewhere (a graph snapshot's: ``specpass graphs --check``)
_fixed: contextvars.ContextVar[dict[str, bool] | None] = contextvars.ContextVar("specpass_lowbit_fixed", default=None)
_memo: dict[str, dict] = {}


@dataclasses.dataclass
class Call:
    """One low-bit call as a program would make it: its blocks, and the fp32 weights of the matrices it replaces
    (several when q/k/v or gate/up are read in one call; empty: rebuilt from the blocks when they are timed)."""

    blocks: tuple[torch.Tensor, ...]  # q, scale, shift, exc_ids, exc_values
    block: int
    bits: int
    weights: list[torch.Tensor]
    #: the matrices' shapes when there are no weights (an engine's call): the same kind as when it was compiled,
    #: so that the same CPU finds the same measurement
    parts: list[tuple[int, int]] | None = None

    @property
    def shapes(self) -> list[tuple[int, int]]:
        if self.weights:
            return [tuple(w.shape) for w in self.weights]
        if self.parts:
            return [tuple(s) for s in self.parts]
        q = self.blocks[0]
        return [(q.shape[0], q.shape[1] * (2 if self.bits == 4 else 1))]

    def rebuilt(self) -> list[torch.Tensor]:
        """The fp32 weights: given, or rebuilt from the blocks."""
        return self.weights or [torch.ops.specpass.lowbit_dequantize(*self.blocks, self.block, self.bits)]


def mode() -> str:
    """The choice mode in effect: ``use_mode``'s, else ``$SPECPASS_LOWBIT_CHOICE``, else "measure"."""
    value = _mode.get() or os.environ.get("SPECPASS_LOWBIT_CHOICE", "").strip().lower() or "measure"
    if value not in MODES:
        raise SpecPassError(f"SPECPASS_LOWBIT_CHOICE={value!r} is not one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def use_mode(value: str | None):
    """Make the choice with ``value`` ("measure" or "always") inside the block; None changes nothing."""
    if value is None:
        yield
        return
    token = _mode.set(value)
    try:
        yield
    finally:
        _mode.reset(token)


@contextlib.contextmanager
def use_choices(choices: dict[str, bool]):
    """Inside the block, ``lowbit_faster`` times nothing: each kind of call gets the choice ``choices`` holds for
    it, and a kind it does not hold the kernel (as in mode "always"). So that a graph snapshot's rewrite is the
    same on any machine."""
    token = _fixed.set(dict(choices))
    try:
        yield
    finally:
        _fixed.reset(token)


def fixed() -> bool:
    """Whether ``use_choices`` is in effect (no kernel is needed to make the choice)."""
    return _fixed.get() is not None


def kind(calls: list[Call], regime: str) -> str:
    """What a measurement depends on besides the machine: the regime, the storage and the matrices' shapes."""
    c = calls[0]
    shift = c.blocks[2].numel() > 0
    shapes = "+".join(f"{n}x{k}" for n, k in c.shapes)
    return f"{regime}|{c.bits}bit/{c.block}{'+shift' if shift else ''}|{shapes}|x{len(calls)}"


def lowbit_faster(calls: list[Call], regime: str) -> dict:
    """Time ``calls`` (one kind: same storage and shapes) with the kernel and in fp32; cached per machine.

    Returns ``{"kind", "lowbit_ms", "fp32_ms", "lowbit": bool}``: the time of one pass over every call (the
    fastest of a few), summed over the regime's token counts.
    """
    what = kind(calls, regime)
    given = _fixed.get()
    if given is not None:
        return {"kind": what, "lowbit_ms": None, "fp32_ms": None, "lowbit": given.get(what, True)}
    from specpass.kernels import load_kernels

    library = load_kernels()
    delay = int(os.environ.get("SPECPASS_KERNEL_TEST_DELAY_US", "0") or 0)

    def measure() -> dict:
        lowbit_ms, fp32_ms = _time(calls, REGIMES[regime])
        return {
            "kind": what,
            "lowbit_ms": round(lowbit_ms, 4),
            "fp32_ms": round(fp32_ms, 4),
            "lowbit": lowbit_ms <= fp32_ms,
        }

    # "fp32 in either order": entries timed against the weight-stationary order alone are not reused
    parts = [os.path.basename(library), str(torch.get_num_threads()), str(delay), "fp32 in either order"]
    return _measured("exact_lowbit", what, parts, measure, describe_choice)


#: a shape of weight whose matrices hold fewer bytes than this keeps the weight-stationary order untimed: its
#: products run from cache in microseconds, where the order's difference is the call's overhead
ORDER_MIN_BYTES = 1 << 20


def order_kind(shape: tuple[int, int]) -> str:
    """The fp32 order's kind: the few-token regime and the weight's shape (not how many such matrices a program
    keeps in fp32, so that every program of a model finds the same measurement)."""
    return f"order|few_tokens|{shape[0]}x{shape[1]}"


#: what ``order_kind`` writes, for reading it back (``order_shape``) and checking it (an engine's manifest)
ORDER_KIND = re.compile(r"order\|few_tokens\|(\d+)x(\d+)")


def order_shape(kind: str) -> tuple[int, int]:
    """The weight shape an ``order_kind`` names."""
    rows, cols = ORDER_KIND.fullmatch(kind).groups()
    return int(rows), int(cols)


def timed_orders(results: dict[str, dict]) -> dict[str, dict]:
    """The ``stationary_faster`` results that were timed on this CPU (not given, not under ORDER_MIN_BYTES)."""
    return {kind: r for kind, r in results.items() if r.get("linear_ms") is not None}


def stationary_faster(weights: list[torch.Tensor]) -> dict:
    """Whether ``W @ x.T`` (weight-stationary) is faster here than ``linear(x, W)`` for 1-4 tokens, over
    ``weights`` (fp32 matrices of one shape) in turn; cached per machine like ``lowbit_faster``.

    Returns ``{"kind", "linear_ms", "stationary_ms", "stationary": bool}``; the times are None where nothing was
    timed (mode "always", given choices, weights below ORDER_MIN_BYTES): then the order is weight-stationary
    unless a given choice says otherwise.
    """
    what = order_kind(tuple(weights[0].shape))
    given = _fixed.get()
    untimed = {"kind": what, "linear_ms": None, "stationary_ms": None, "stationary": True}
    if given is not None:
        return {**untimed, "stationary": given.get(what, True)}
    if mode() == "always" or sum(w.nbytes for w in weights) < ORDER_MIN_BYTES:
        return untimed

    def measure() -> dict:
        linear_ms, stationary_ms = _time_orders(weights, REGIMES["few_tokens"])
        return {
            "kind": what,
            "linear_ms": round(linear_ms, 4),
            "stationary_ms": round(stationary_ms, 4),
            "stationary": stationary_ms < linear_ms,
        }

    return _measured("fp32 order", what, [torch.__version__, str(torch.get_num_threads())], measure, describe_order)


def _measured(label: str, what: str, parts: list[str], measure, describe) -> dict:
    """``measure()``'s result for ``what`` on this machine: from this process, from choices.json, or timed now
    (then logged as ``label`` and stored there). ``parts``: what else the measurement depends on."""
    key = hashlib.sha256("\0".join([what, machine.cpu_key(), *parts]).encode()).hexdigest()[:24]
    if key in _memo:
        return _memo[key]
    path = choices_path()
    stored = _read(path)
    if key in stored:
        _memo[key] = stored[key]
        return stored[key]
    result = measure()
    log.info("%s: %s: %s", label, what, describe(result))
    stored = _read(path)  # another process may have added entries meanwhile
    stored[key] = result
    write_atomic(path, json.dumps(stored, indent=1, sort_keys=True).encode())
    _memo[key] = result
    return result


def choices_path():
    """Where the measurements are kept: ``<cache>/kernels/choices.json``."""
    return cache_root() / "kernels" / "choices.json"


def _read(path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _time(calls: list[Call], tokens: tuple[int, ...]) -> tuple[float, float]:
    """(kernel ms, fp32 ms) over every call; a few tokens' fp32 time is that of the faster operand order."""
    weights = [w for c in calls for w in c.rebuilt()]

    def fp32(x: torch.Tensor) -> float:
        orders = [_linear_pass] if x.shape[1] > PREFILL_TOKENS else [_linear_pass, _stationary_pass]
        return min(order(weights, x) for order in orders)

    kernel_ms, fp32_ms = _fastest([lambda x: _kernel_pass(calls, x), fp32], calls[0].shapes[0][1], tokens)
    return kernel_ms, fp32_ms


def _time_orders(weights: list[torch.Tensor], tokens: tuple[int, ...]) -> tuple[float, float]:
    """(``linear`` ms, weight-stationary ms) over ``weights``."""
    passes = [lambda x: _linear_pass(weights, x), lambda x: _stationary_pass(weights, x)]
    linear_ms, stationary_ms = _fastest(passes, weights[0].shape[1], tokens)
    return linear_ms, stationary_ms


def _fastest(passes: list, k: int, tokens: tuple[int, ...]) -> list[float]:
    """Each pass's ms (``pass(x)`` returns its seconds for x of k columns): per token count, the fastest of a few
    runs (the least disturbed by whatever else runs), summed. The passes alternate, so that a slow moment of the
    machine hits them all."""
    totals = [0.0] * len(passes)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, k, generator=gen)
            for run in passes:  # warm-up
                run(x)
            runs: list[list[float]] = [[] for _ in passes]
            for _ in range(_REPEATS):
                for run, seconds in zip(passes, runs, strict=True):
                    seconds.append(run(x))
            totals = [total + min(seconds) for total, seconds in zip(totals, runs, strict=True)]
    return [1e3 * total for total in totals]


def _kernel_pass(calls: list[Call], x: torch.Tensor) -> float:
    start = time.perf_counter()
    for c in calls:
        torch.ops.specpass.lowbit_linear(x, *c.blocks, c.block, c.bits)
    return time.perf_counter() - start


def _linear_pass(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    for w in weights:
        torch.nn.functional.linear(x, w)
    return time.perf_counter() - start


def _stationary_pass(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """passes/linear_operand_order.py's product: ``W @ x.T`` with a zero column."""
    t, k = x.shape[1], x.shape[2]
    start = time.perf_counter()
    cols = torch.cat([x.reshape(t, k), x.new_zeros(1, k)]).t()
    for w in weights:
        torch.mm(w, cols)
    return time.perf_counter() - start


def describe_order(result: dict) -> str:
    """``linear 1.234 ms, W @ x.T 5.678 ms: linear`` for a ``stationary_faster`` result."""
    chosen = "W @ x.T" if result["stationary"] else "linear"
    if result.get("linear_ms") is None:
        return f"{chosen} (not timed)"
    return f"linear {result['linear_ms']:.3f} ms, W @ x.T {result['stationary_ms']:.3f} ms: {chosen}"


def summarize_orders(results: dict[str, dict]) -> str:
    """One line on the fp32 orders timed on this CPU (``stationary_faster`` results), or "" where none was."""
    timed = list(timed_orders(results).values())
    if not timed:
        return ""
    stationary = sum(r["stationary"] for r in timed)
    return (
        f"fp32 products of a few tokens: linear for {len(timed) - stationary} and W @ x.T for {stationary} of "
        f"{len(timed)} shapes of weight (both timed on this CPU)"
    )


def describe_choice(result: dict) -> str:
    """``kernel 1.234 ms, fp32 5.678 ms: kernel`` for a ``lowbit_faster`` result."""
    chosen = "kernel" if result["lowbit"] else "fp32"
    if result.get("lowbit_ms") is None:
        return f"{chosen} (given, not timed)"
    return f"kernel {result['lowbit_ms']:.3f} ms, fp32 {result['fp32_ms']:.3f} ms: {chosen}"


def use_dense_where_faster(calls: dict[str, list[tuple]]) -> tuple[dict[str, dict], list[torch.Tensor]]:
    """For blocks that only exist as blocks (an engine file's): where fp32 is faster on this CPU, rebuild the fp32
    weights once and have ``lowbit_linear`` multiply by them instead (``lowbit_use_dense``), a few tokens in the
    operand order that is faster here.

    ``calls``: regime -> [(q, scale, shift, exc_ids, exc_values, block, bits, shapes of the matrices), ...].
    Returns the measurements by kind of call, as ``lowbit_faster`` gives them, and the codes tensors now read as
    fp32 (``forget_dense``).
    """
    kinds: dict[tuple[str, str], list[Call]] = {}  # (regime, kind of one call) -> the calls
    for regime, entries in calls.items():
        seen = set()
        for *blocks, block, bits, shapes in entries:
            if blocks[0].data_ptr() in seen:  # the same blocks in two programs of one regime
                continue
            seen.add(blocks[0].data_ptr())
            call = Call(tuple(blocks), block, bits, [], shapes)
            kinds.setdefault((regime, kind([call], regime)), []).append(call)
    results: dict[str, dict] = {}
    dense_for: dict[int, list] = {}  # q's address -> [q, fp32 weights, regimes where they are faster]
    for (regime, _), same in kinds.items():
        result = lowbit_faster(same, regime)
        results[result["kind"]] = result
        if result["lowbit"]:
            continue
        for c in same:
            entry = dense_for.get(c.blocks[0].data_ptr())
            if entry is None:
                entry = dense_for[c.blocks[0].data_ptr()] = [c.blocks[0], c.rebuilt()[0], set()]
            entry[2].add(regime)
    by_shape: dict[tuple, list[torch.Tensor]] = {}  # a few tokens' fp32 order, as the programs' own is chosen
    for _, dense, regimes in dense_for.values():
        if "few_tokens" in regimes:
            by_shape.setdefault(tuple(dense.shape), []).append(dense)
    stationary = {shape: stationary_faster(weights)["stationary"] for shape, weights in by_shape.items()}
    for q, dense, regimes in dense_for.values():
        few = "few_tokens" in regimes
        order = stationary.get(tuple(dense.shape), True)
        torch.ops.specpass.lowbit_use_dense(q, dense, few, "prefill" in regimes, order)
    if dense_for:
        log.info("exact_lowbit: %d block matrices multiply as fp32 on this CPU (faster here)", len(dense_for))
    return results, [q for q, _, _ in dense_for.values()]


def forget_dense(codes: list[torch.Tensor]) -> None:
    """Undo ``use_dense_where_faster`` for these codes tensors (their fp32 weights are freed)."""
    for q in codes:
        torch.ops.specpass.lowbit_use_dense(q, q.new_empty((q.shape[0], 0), dtype=torch.float32), False, False)


def summarize(choices: dict[str, dict]) -> str:
    """One line: which kinds of call use the kernel and which stay fp32, from ``lowbit_faster`` results."""
    if not choices:
        return "kernel wherever a weight is on a grid (not timed)"
    fp32 = [what for what, r in choices.items() if not r["lowbit"]]
    line = f"kernel for {len(choices) - len(fp32)} of {len(choices)} kinds of call (timed against fp32 here)"
    if not fp32:
        return line
    # Counted per regime (prefill, few tokens); which kinds they are is in the choices themselves (bench --json,
    # inspect --json), too long for this line.
    regimes: dict[str, list[str]] = {}
    for what in choices:
        regimes.setdefault(what.split("|")[0], []).append(what)
    said = []
    for regime, kinds in regimes.items():
        slow = sum(k in fp32 for k in kinds)
        if slow:
            said.append(
                f"the {slow} {regime} kinds" if slow == len(kinds) else f"{slow} of the {len(kinds)} {regime} kinds"
            )
    return f"{line}; fp32 for {', '.join(said)}"
