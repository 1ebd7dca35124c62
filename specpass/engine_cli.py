"""``specpass compile``, ``specpass run`` and ``specpass inspect``: engine files from the command line.

``run`` and ``inspect`` import neither transformers nor specpass's compiler side: an engine is read with
the ``tokenizers`` library and AOTInductor's loader only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from specpass.cli_args import EXACT_LOWBIT_HELP, MODEL_HELP
from specpass.errors import SpecPassError
from specpass.output_paths import check_output_file


# ---- compile -------------------------------------------------------------------------------------------
def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compile a model into one engine file: the AOTInductor programs (prefill, decode/verify, draft), "
        "the weights once, the tokenizer and the speculation plan. By default the plan is the cached one "
        "for this model, or calibrated now (as specpass.optimize does)."
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, metavar="OUT.specpass", help="the engine file to write")
    parser.add_argument(
        "--backend",
        default="aoti",
        choices=("aoti", "tensorrt"),
        help="aoti: AOTInductor (CPU or GPU); tensorrt: Torch-TensorRT, needs a CUDA GPU (default: %(default)s)",
    )
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--plan", metavar="PLAN.json", help="use this SpecPlan (from specpass.calibrate / SpecPlan.save)")
    plan.add_argument("--calibrate", action="store_true", help="calibrate now, even when a cached plan exists")
    plan.add_argument("--no-speculate", action="store_true", help="plain compiled decoding only")
    parser.add_argument("--no-exact-lowbit", action="store_true", help=EXACT_LOWBIT_HELP)
    parser.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        metavar="N",
        help="longest prompt + answer (default: 1024, or the model's position limit where smaller)",
    )
    parser.add_argument(
        "--isa",
        choices=("avx512", "avx2", "generic"),
        default=None,
        help="the x86-64 level the CPU programs are compiled for: the engine runs on every CPU of that level "
        "(avx512: x86-64-v4, Skylake-X and Zen 4 on; avx2: x86-64-v3, Haswell and Zen on; generic: any x86-64, "
        "slow). Default: this CPU's best",
    )
    parser.add_argument(
        "--sign", metavar="KEY", help="sign the engine with this Ed25519 private key (make one with specpass keygen)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def run_compile(args: argparse.Namespace) -> int:
    import time

    import specpass
    from specpass import models
    from specpass.engine import write_engine

    if args.backend == "tensorrt":
        from specpass.lower.tensorrt import require_tensorrt

        require_tensorrt()  # a clear error without a GPU or torch-tensorrt
        raise SpecPassError(
            "engine files hold AOTInductor packages; a TensorRT engine file is not implemented yet. Use "
            "--backend aoti, or specpass.optimize(model, backend='tensorrt') in Python"
        )
    out = Path(args.output)
    if out.is_dir():
        raise SpecPassError(f"{out} is a directory; pass a file path such as {out / 'model.specpass'}")
    check_output_file(out, "-o")
    sign_key = None
    if args.sign:
        from specpass.signing import load_private_key

        sign_key = load_private_key(args.sign)  # a bad key fails now, not after the compile
    plan = None
    if args.plan:
        if not Path(args.plan).is_file():
            raise SpecPassError(f"--plan {args.plan}: no such file")
        plan = specpass.SpecPlan.load(args.plan)
    t0 = time.perf_counter()
    model, tokenizer = models.load(args.model)
    sm = specpass.optimize(
        model,
        speculate=False if args.no_speculate else "auto",
        plan=plan,
        tokenizer=tokenizer,
        max_cache_len=args.max_cache_len,
        recalibrate=args.calibrate,
        exact_lowbit=not args.no_exact_lowbit,
        isa=args.isa,
    )
    manifest = write_engine(sm, out, tokenizer=tokenizer, sign_key=sign_key)
    size = out.stat().st_size
    result = {
        "engine": str(out),
        "bytes": size,
        "weight_bytes": manifest["weight_bytes"],
        "programs": sorted(manifest["programs"]),
        "plan": sm.plan.describe() if sm.plan is not None else "no speculation",
        "seconds": time.perf_counter() - t0,
        "signed_by": None,
        "isa": (manifest["cpu"] or {}).get("isa"),
    }
    if sign_key is not None:
        from specpass.signing import fingerprint

        result["signed_by"] = fingerprint(sign_key.public_key())
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cpus = f" for {_level(result['isa'])} CPUs" if result["isa"] else ""
        print(
            f"wrote {out}: {size / 1e6:.1f} MB ({size / manifest['weight_bytes']:.3f}x the weights), programs "
            f"{', '.join(result['programs'])}{cpus}; {result['plan']}; {result['seconds']:.0f}s"
            + (f"; signed by {result['signed_by']}" if result["signed_by"] else "")
        )
    return 0


# ---- run -----------------------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Generate from an engine file alone (no model download, no transformers modeling code)."
    parser.add_argument("engine", help="an engine file written by specpass compile")
    parser.add_argument(
        "--trust",
        action="append",
        metavar="KEY.pub",
        help="load the engine only if one of these Ed25519 public keys signed it (repeatable); an engine is native "
        "code that runs in this process",
    )
    parser.add_argument("--prompt", required=True, help="the user's message (the chat template is applied)")
    parser.add_argument("--raw", action="store_true", help="tokenize the prompt as it is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0: greedy; > 0: sampling (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sampling: keep the K likeliest")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="sampling: nucleus mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling: random seed")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--json", action="store_true", help='print {"text", "token_ids", "stats"} as JSON')


class _TextStream:
    """Prints the answer as tokens arrive; decoding the whole answer each time keeps multi-byte characters whole."""

    def __init__(self, engine):
        self.engine, self.ids, self.shown, self.prompt_seen = engine, [], "", False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1))
        self._show(final=False)

    def _show(self, final: bool) -> None:
        text = self.engine.decode(self.ids)
        if final or not text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            sys.stdout.write(text[len(self.shown) :] + ("\n" if final else ""))
            sys.stdout.flush()
            self.shown = text

    def end(self) -> None:
        self._show(final=True)


def run_run(args: argparse.Namespace) -> int:
    import torch

    from specpass.engine import load_engine, read_manifest

    # All before the engine loads: a mistake costs no load, and no option is silently ignored.
    if args.temperature < 0:
        raise SpecPassError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise SpecPassError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 0:
        raise SpecPassError(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SpecPassError(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling_only = [
        f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None
    ]
    if args.temperature == 0 and sampling_only:
        raise SpecPassError(
            f"{', '.join(sampling_only)} only apply when sampling, and --temperature 0 (the default) decodes "
            "greedily: add --temperature T (> 0)"
        )
    if not args.trust:
        read_manifest(args.engine)  # a file that is no engine gets its one line first, without the note
        print(
            "specpass: note: an engine file is native code that runs in this process; run only engines you trust "
            "(--trust KEY.pub accepts only engines signed by that key)",
            file=sys.stderr,
        )
    engine = load_engine(args.engine, trust=args.trust)
    ids = engine.encode(args.prompt) if args.raw else engine.chat_ids(args.prompt)
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.seed is not None:
            sampling["generator"] = torch.Generator().manual_seed(args.seed)
    streamer = _TextStream(engine) if args.stream and not args.json else None
    out = engine.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    new = out[0, ids.shape[1] :].tolist()
    text = engine.decode(new)
    stats = {**engine.last_stats.as_dict(), "load_s": engine.load_s}
    if args.json:
        print(json.dumps({"text": text, "token_ids": new, "stats": stats}))
    elif streamer is None:
        print(text)
    if not args.json:
        print(
            f"[{len(new)} tokens, {stats['tokens_per_s']:.1f} tokens/s, tau {stats['tau']:.2f}, "
            f"engine loaded in {engine.load_s:.1f}s]",
            file=sys.stderr,
        )
    return 0


# ---- inspect -------------------------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Show an engine file's manifest, plan and programs (signature, op counts, pass history)."
    parser.add_argument("engine", help="an engine file written by specpass compile")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--ops", type=int, default=8, metavar="N", help="most frequent ops shown per program")


def _describe_cache(cache: dict) -> str:
    """'1024 tokens, 30 layers: K/V 3 x 64 (30), fp32' from a manifest's cache entry (either format)."""
    if "tensors" not in cache:  # format 1
        return (
            f"{cache['max_cache_len']} tokens, {cache['num_layers']} layers x {cache['num_kv_heads']} KV heads "
            f"x {cache['head_dim']}, {cache['dtype']}"
        )
    shapes: dict[str, int] = {}
    for t in cache["tensors"]:
        if t["kind"] != "v":
            what = "K/V " if t["kind"] == "k" else f"{t['kind']} "
            key = what + " x ".join(map(str, t["shape"]))
            shapes[key] = shapes.get(key, 0) + 1
    layout = ", ".join(f"{k} ({n})" for k, n in shapes.items())
    return f"{cache['max_cache_len']} tokens, {cache['num_layers']} layers: {layout}, {cache['dtype']}"


def run_inspect(args: argparse.Namespace) -> int:
    from specpass.engine import read_manifest, read_signer

    m = read_manifest(args.engine)
    signer = read_signer(args.engine)
    if args.json:
        print(json.dumps({**m, "signed_by": signer}, indent=1))
        return 0
    config = m["model"]["config"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    print(f"engine      {args.engine} (format {m['format_version']}, {m['backend']}; built with {versions})")
    print(f"model       {m['model']['class']} {m['model']['name_or_path']}".rstrip())
    layers, hidden = config.get("num_hidden_layers", "?"), config.get("hidden_size", "?")
    print(f"            {layers} layers, hidden {hidden}, vocab {m['vocab_size']}")
    print(f"cache       {_describe_cache(m['cache'])}")
    cpu = m.get("cpu")
    if cpu:
        print(f"cpu         programs for {_level(cpu['isa'])} CPUs, compiled on {cpu.get('compiled_on', '?')}")
    elif m.get("device", "cpu") == "cpu":
        print("cpu         programs for the CPU that compiled them (-march=native: an engine of format 3 or older)")
    plan = m["plan"]
    if plan is None:
        print("plan        none (plain decoding)")
    else:
        from specpass.tune.plan import SpecPlan

        described = SpecPlan.from_json(json.dumps(plan)).describe()
        print(f"plan        {described}")
        if plan.get("reason") and plan["reason"] not in described:  # a plan without speculation says it already
            print(f"            {plan['reason']}")
    print(f"weights     {m['weight_bytes'] / 1e6:.1f} MB, stored once")
    if m.get("rebuilt"):
        print(
            f"            {len(m['rebuilt'])} fp32 matrices not stored: rebuilt from their blocks at load, bit for bit"
        )
    for line in _lowbit_lines(m.get("lowbit") or {}):
        print(f"            {line}")
    build = m.get("lowbit_build")
    if build:
        from specpass.kernels.choice import summarize

        print(f"kernels     {build['isa']} on {build['cpu']}: {summarize(build['choices'])}")
        print("            timed again against fp32 where the engine is loaded; fp32 is used there if faster")
    for name, info in m["programs"].items():
        s = info["summary"]
        print(f"program     {name}: {s.get('nodes', '?')} nodes, {len(info['constants'])} constants")
        for line in _grouped(s.get("signature", [])):
            print(f"              {line}")
        passes = [f"{h['pass']} ({h['n_matches']})" for h in s.get("passes", [])]
        print(f"              passes: {', '.join(passes) or 'none'}")
        top = sorted(s.get("ops", {}).items(), key=lambda kv: -kv[1])[: args.ops]
        print(f"              ops: {', '.join(f'{op} x{n}' for op, n in top)}")
    checked = m.get("tree_verify")  # engines written before draft trees lack these two
    if checked:
        passes = ", ".join(h["pass"] for h in checked.get("passes", []))
        print(f"trees       decode verifies draft trees (checked by: {passes})")
    if m.get("recycled_tokens"):
        print(f"recycled    {m['recycled_tokens']} tokens in the recycled-token table")
    print(
        f"signed      {f'by {signer} (not verified here: specpass run --trust KEY.pub checks it)' if signer else 'no'}"
    )
    print(
        "native code the programs are compiled shared libraries that run in the process loading them; the checksums "
        "prove the file intact, not who wrote it: run only engines you trust (specpass run --trust KEY.pub)"
    )
    return 0


def _level(isa: str) -> str:
    """An x86-64 level as a user knows it."""
    names = {"avx512": "AVX-512 (x86-64-v4)", "avx2": "AVX2 (x86-64-v3)", "generic": "any x86-64"}
    return names.get(isa, f"{isa} ({'this CPU' if isa == 'native' else 'unknown level'})")


def _lowbit_lines(lowbit: dict) -> list[str]:
    """The weights stored as quantization blocks, one line per format and weight (layers collapsed)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for name, info in lowbit.items():
        pattern = re.sub(r"\.(\d+)\.", ".*.", name, count=1)
        groups.setdefault((info["format"], pattern), []).append(info)
    lines = []
    for (fmt, pattern), infos in sorted(groups.items()):
        fp32 = sum(i["fp32_blocks"] for i in infos)
        blocks = sum(i["blocks"] for i in infos)
        count = f" ({len(infos)} matrices)" if len(infos) > 1 else ""
        kept = f", {fp32} of {blocks} blocks kept in fp32" if fp32 else ""
        lines.append(f"{fmt:<5} {pattern}{count}: {sum(i['bytes'] for i in infos) / 1e6:.1f} MB{kept}")
    return lines


# ---- keygen ----------------------------------------------------------------------------------------------
def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write an Ed25519 key pair for signing engines: PATH (private, mode 0600) and PATH.pub."
    parser.add_argument("path", help="where to write the private key; the public key goes to PATH.pub")
    parser.add_argument("--json", action="store_true", help='print {"private", "public", "fingerprint"} as JSON')


def run_keygen(args: argparse.Namespace) -> int:
    from specpass.signing import generate_key

    public, fingerprint = generate_key(args.path)
    if args.json:
        print(json.dumps({"private": str(args.path), "public": str(public), "fingerprint": fingerprint}))
    else:
        print(f"wrote {args.path} (keep it private) and {public}; fingerprint {fingerprint}")
        print(f"sign: specpass compile ... --sign {args.path}    verify: specpass run ENGINE --trust {public} ...")
    return 0


def _grouped(signature: list[str]) -> list[str]:
    """Signature lines with runs of inputs of one type (the KV cache's k_i, v_i) folded into one line."""
    out, run = [], []

    def flush():
        if len(run) > 2:
            out.append(f"{run[0][0]} .. {run[-1][0]} ({len(run)} inputs): {run[0][1]}")
        else:
            out.extend(f"{name}: {kind}" for name, kind in run)
        run.clear()

    for line in signature:
        name, sep, kind = line.partition(": ")
        if not sep:  # the output line
            flush()
            out.append(line)
            continue
        if run and run[-1][1] != kind:
            flush()
        run.append((name, kind))
    flush()
    return out
