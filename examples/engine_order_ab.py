"""Load an fp32 engine whose programs multiply in the other operand order, as if compiled on another CPU: the
warning loading gives, and what that order costs here against an engine compiled on this CPU.

    python examples/engine_order_ab.py [--turns 6] [--tokens 128] [--out DIR]

Why it exists: a program keeps the fp32 operand order (``W @ x.T`` or ``linear``) its passes timed where it was
compiled, and the faster one differs between CPUs (docs/benchmarks.md, "Engines on another CPU"). The default
model is compiled twice with ``exact_lowbit=False``: in the orders timed here, and with ``W @ x.T`` for every
shape (what a Zen 4 chose); the second engine's manifest then names another CPU. Run it with nothing else on the
machine: two compiles of about 75 s each on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from specpass.engine import MANIFEST, load_engine, write_engine
from specpass.kernels import choice
from specpass.models import default_model
from specpass.programs import compile_plain
from specpass.tokenization import chat_ids

PROMPT = "Write a short story about a lighthouse keeper."


def as_from_another_cpu(src: Path, dst: Path, orders: dict) -> None:
    """A copy of the engine whose manifest says it was compiled, and its orders timed, on another CPU."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == MANIFEST:
                manifest = json.loads(data)
                manifest["cpu"].update(cpu_key="x86_64|Another CPU|avx512f", compiled_on="another CPU", orders=orders)
                data = json.dumps(manifest).encode()
            zout.writestr(info.filename, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the engines go (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="specpass-order-"))
    model, tok = default_model(progress=False)
    here = compile_plain(model, backend="inductor", max_cache_len=512, progress=False, exact_lowbit=False)
    write_engine(here, out / "here.specpass", tokenizer=tok)
    with choice.use_choices({}):  # no timing: W @ x.T for every shape
        other = compile_plain(model, backend="inductor", max_cache_len=512, progress=False, exact_lowbit=False)
    write_engine(other, out / "stationary.specpass", tokenizer=tok)
    timed = {k: r for k, r in here.order_choices.items() if r["linear_ms"] is not None}
    print(
        "orders timed here:",
        {k.rsplit("|", 1)[-1]: "W @ x.T" if r["stationary"] else "linear" for k, r in timed.items()},
    )
    as_from_another_cpu(
        out / "stationary.specpass", out / "other.specpass", {k: {**r, "stationary": True} for k, r in timed.items()}
    )
    engines = {"orders timed here": load_engine(out / "here.specpass"), "W @ x.T": load_engine(out / "other.specpass")}
    ids = chat_ids(tok, PROMPT)
    ms, outs = {k: [] for k in engines}, {}
    for turn in range(args.turns):
        for name in list(engines) if turn % 2 == 0 else list(reversed(engines)):
            t0 = time.perf_counter()
            outs[name] = engines[name].generate(ids, max_new_tokens=args.tokens, do_sample=False)
            ms[name].append((time.perf_counter() - t0) / args.tokens * 1e3)
    for name, times in ms.items():
        print(f"{name}: ms a token (prefill included) {sorted(round(t, 2) for t in times)}")
    print(f"same tokens: {torch.equal(*outs.values())}")


if __name__ == "__main__":
    main()
