"""``specpass bench``'s command line and loop: prompts, setup, warm-up, the timed generations, the comparison
with HF eager's tokens."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from specpass.bench.compare import Results
from specpass.bench.methods import (
    DEFAULT_METHODS,
    METHODS,
    REFERENCE,
    WARM_UP_MESSAGES,
    BenchConfig,
    Method,
    MethodUnavailable,
    Runner,
)
from specpass.bench.report import report, write
from specpass.capture import rounded_cache_len
from specpass.cli_args import (
    EXACT_LOWBIT_HELP,
    MODEL_HELP,
    add_backend_argument,
    add_threads_argument,
    apply_threads,
)
from specpass.errors import SpecPassError
from specpass.output_paths import check_output_file
from specpass.progress import progress_bar

log = logging.getLogger("specpass.bench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Spec-Bench's dev split, shipped in the package (Apache-2.0; LICENSE and README beside it)
_DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "spec_bench" / "dev.jsonl"


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Benchmark specpass against Hugging Face baselines on Spec-Bench prompts: greedy, batch 1, methods "
        "alternating per prompt in one process. Reports tokens/s, the ratio to HF eager, compile and warm-up "
        "time, and whether every method's output equals HF eager's. Exit code 1 if one does not "
        "(beyond near-ties of HF's own logits)."
    )
    parser.add_argument(
        "--model",
        default="default",
        help=f"{MODEL_HELP} (default: %(default)s)",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="PATH",
        help="Spec-Bench question file (JSONL: question_id, category, turns); default: the dev split shipped "
        "with specpass (specpass/data/spec_bench/dev.jsonl)",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=12,
        metavar="N",
        help="questions to run, sampled round-robin over categories (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: %(default)s)",
    )
    add_backend_argument(parser)
    parser.add_argument("--no-exact-lowbit", action="store_true", help=EXACT_LOWBIT_HELP)
    add_threads_argument(parser)
    parser.add_argument(
        "--device", default="cpu", help="where every method runs: cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="the model's dtype for every method (default: as loaded, float32 for the bundled model)",
    )
    parser.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        metavar="N",
        help="KV cache size of the static-cache methods, the same for every prompt "
        "(default: longest prompt + max new tokens, rounded up to 64)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        metavar="PATH",
        help="a SpecPlan JSON file for specpass (default: the cached plan, calibrating the model if there is none)",
    )
    parser.add_argument(
        "--gguf",
        default=None,
        metavar="PATH",
        help="the GGUF file llama.cpp runs (llamacpp, llamacpp_lookup; default: the one a bundled model was "
        "converted from)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="time the prompts N times; each method's ratio to HF eager is the median over the repeats "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="PATH",
        help="a JSON report (--json) of an earlier run on this CPU with the same threads: exit 1 when a method's "
        "ratio to HF eager fell by more than --max-slowdown from it (a speed gate for CI)",
    )
    parser.add_argument(
        "--max-slowdown",
        type=float,
        default=0.05,
        metavar="F",
        help="with --baseline: the fall of a ratio tolerated, as a fraction (default: %(default)s)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full results as JSON")
    parser.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="write the tables, command and machine as a Markdown section (for docs/benchmarks.md)",
    )


def run_bench(args: argparse.Namespace, *, model=None, tokenizer=None, methods: dict[str, Method] | None = None) -> int:
    """Run the benchmark that ``args`` describe; ``model``/``tokenizer``/``methods`` may be injected (tests)."""
    from specpass.tokenization import chat_ids

    registry = METHODS if methods is None else methods
    names = _parse_methods(args.methods, registry)
    if args.num_prompts < 1:
        raise SpecPassError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_new_tokens < 1:
        raise SpecPassError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise SpecPassError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.max_slowdown < 1:
        raise SpecPassError(f"--max-slowdown is a fraction in [0, 1), got {args.max_slowdown:g}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            check_output_file(path, flag)
    device = bench_device(args.device)
    args.threads = apply_threads(args.threads)  # a number from here on: the report and llama.cpp use it
    baseline = load_baseline(args.baseline, args.threads, device) if args.baseline else None
    prompts_path = resolve_prompts(args.prompts)
    questions = stratified_sample(load_questions(prompts_path), args.num_prompts)

    loaded_here = model is None
    if model is None:
        from specpass import models

        model, tokenizer = models.load(args.model)
    elif tokenizer is None:
        raise SpecPassError("run_bench: a model was given without its tokenizer")
    model = model.to(device=device, dtype=DTYPES[args.dtype] if args.dtype else None).eval()

    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template; using the raw question text as the prompt")
    prompts = [chat_ids(tokenizer, q["turns"][0]).to(device) for q in questions]
    warm_ups = [chat_ids(tokenizer, m).to(device) for m in WARM_UP_MESSAGES]
    longest = max(p.shape[1] for p in prompts + warm_ups)
    max_cache_len = args.max_cache_len or rounded_cache_len(model, longest + args.max_new_tokens, 64)
    if longest + args.max_new_tokens > max_cache_len:
        raise SpecPassError(
            f"--max-cache-len {max_cache_len} is too small: the longest prompt has {longest} tokens, plus "
            f"--max-new-tokens {args.max_new_tokens}; pass at least {longest + args.max_new_tokens}"
        )
    gen = model.generation_config
    gguf = args.gguf
    lossy = [n for n in names if not registry[n].lossless]
    if gguf is None and loaded_here and lossy and importlib.util.find_spec("llama_cpp") is not None:
        from specpass import models  # llama.cpp runs the GGUF file the model was converted from

        gguf = models.gguf_file(args.model, progress=True)
    cfg = BenchConfig(
        max_new_tokens=args.max_new_tokens,
        max_cache_len=max_cache_len,
        backend=args.backend,
        exact_lowbit=not args.no_exact_lowbit,
        device=device,
        plan=_load_plan(args.plan),
        gguf=gguf,
        methods=tuple(names),
        eos_token_id=gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id,
    )
    log.info("%d prompts (%s), %d methods, max_cache_len %d", len(prompts), prompts_path, len(names), max_cache_len)

    runners: dict[str, Runner] = {}
    setup_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        log.info("setting up %s", name)
        t0 = time.perf_counter()
        try:
            runners[name] = registry[name].setup(model, tokenizer, cfg)
        except MethodUnavailable as e:
            if name == REFERENCE:
                raise
            log.warning("skipping %s: %s", name, e)
            skipped[name] = str(e)
            continue
        setup_s[name] = time.perf_counter() - t0
    warm_up_s: dict[str, float] = {}
    failed_own = False
    for name in [n for n in names if n not in skipped]:
        runner = runners[name]
        t0 = time.perf_counter()
        try:
            for i in range(runner.warm_up_runs):
                runner.generate(warm_ups[i % len(warm_ups)])
        except Exception as e:  # noqa: BLE001 - a method that fails to run leaves the table of the others
            skipped[name] = _failure(name, "in warm-up", e)
            failed_own |= registry[name].own
            continue
        warm_up_s[name] = time.perf_counter() - t0
        log.info("%s: setup %.1f s, warm-up %.1f s", name, setup_s[name], warm_up_s[name])
    names = [n for n in names if n not in skipped]
    results = Results(names)
    results.skipped = skipped
    results.setup_s.update(setup_s)
    results.warm_up_s.update(warm_up_s)
    results.notes = {n: runners[n].note for n in names if runners[n].note}

    total = len(prompts) * len(names) * args.repeats
    with progress_bar(total=total, desc="bench", unit="gen") as bar:
        for repeat in range(args.repeats):
            for i, (q, ids) in enumerate(zip(questions, prompts, strict=True)):
                live = results.names  # a method that fails is dropped from it (Results.drop), not from this copy
                shift = i % len(live)
                for name in live[shift:] + live[:shift]:
                    bar.set_postfix_str(f"{q['category']} {name}")
                    graphs = _graphs_compiled()
                    _synchronize(device)
                    t0 = time.perf_counter()
                    try:
                        out = runners[name].generate(ids)
                    except Exception as e:  # noqa: BLE001 - as in warm-up: the other methods still get their table
                        results.drop(name, _failure(name, f"on question {q['question_id']} ({q['category']})", e))
                        failed_own |= registry[name].own
                        bar.update((args.repeats - repeat) * len(prompts) - i)
                        continue
                    _synchronize(device)  # a method may return before its last kernels have run
                    seconds = time.perf_counter() - t0
                    compiled = _graphs_compiled() - graphs
                    if compiled:
                        log.warning("%s compiled %d graph(s) during timed prompt %s", name, compiled, q["question_id"])
                    tau = runners[name].tau() if runners[name].tau is not None else None
                    results.record(i, name, out, seconds, compiled, tau, repeat)
                    bar.update()

    data = report(args, results, questions, prompts, model, tokenizer, cfg, prompts_path, lossy=set(lossy))
    if failed_own:
        data["json"]["exit_code"] = 1
    if baseline is not None:
        gate = speed_gate(baseline, data["json"]["summary"], args.max_slowdown)
        data["json"]["gate"] = gate
        data["text"] += "\n\n" + "\n".join(gate["lines"])
        if gate["slower"]:
            data["json"]["exit_code"] = 1
    print(data["text"])
    if args.json:
        write(args.json, json.dumps(data["json"], indent=2) + "\n")
    if args.markdown:
        write(args.markdown, data["markdown"])
    return data["json"]["exit_code"]


def load_baseline(path: str, threads: int, device: torch.device) -> dict:
    """``--baseline``: an earlier run's JSON report, refused unless it ran on this CPU model with these threads
    (a ratio to HF eager measured elsewhere says nothing about this machine)."""
    from specpass.bench.report import machine_info

    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        old, summary = data["machine"], data["summary"]
        ratios = {name: float(s["ratio"]) for name, s in summary.items()}
    except FileNotFoundError:
        raise SpecPassError(f"--baseline {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecPassError(f"--baseline {path} is not a JSON report of `specpass bench --json` ({e!r})") from e
    here = machine_info(threads, device)
    for key in ("cpu", "threads", "gpu"):
        if old.get(key) != here[key]:
            raise SpecPassError(
                f"--baseline {path} ran with {key} {old.get(key)!r}, this run has {here[key]!r}: "
                "compare runs of one machine (make a baseline here with --json)"
            )
    return {"path": path, "ratios": ratios, "date": old.get("date")}


def speed_gate(baseline: dict, summary: dict, max_slowdown: float) -> dict:
    """Each method's ratio to HF eager against the baseline's; ``slower``: those that fell by more than
    ``max_slowdown`` (a fraction of the baseline's ratio)."""
    lines, slower = [], []
    for name, s in summary.items():
        if name == REFERENCE or name not in baseline["ratios"]:
            continue
        was, now = baseline["ratios"][name], s["ratio"]
        change = now / was - 1 if was else 0.0
        fell = change < -max_slowdown
        slower += [name] if fell else []
        verdict = f"SLOWER by more than {max_slowdown:.0%}" if fell else "ok"
        lines.append(f"speed gate: {name} {was:.2f}x -> {now:.2f}x HF eager ({change:+.1%}): {verdict}")
    missing = [n for n in baseline["ratios"] if n != REFERENCE and n not in summary]
    if missing:
        lines.append(f"speed gate: not in this run: {', '.join(missing)}")
    lines.append(
        f"speed gate: baseline {baseline['path']} ({baseline['date']}); "
        + (f"FAILED: {', '.join(slower)}" if slower else "passed")
    )
    return {"baseline": baseline["path"], "max_slowdown": max_slowdown, "slower": slower, "lines": lines}


def _failure(name: str, where: str, e: Exception) -> str:
    """Logs a method's failure (with its traceback) and returns the one line the report shows for it."""
    if name == REFERENCE:
        raise e
    log.warning("dropping %s: it failed %s", name, where, exc_info=e)
    return f"failed {where}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def bench_device(spec: str) -> torch.device:
    """``--device``, checked: a CUDA device needs a GPU that torch sees."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise SpecPassError(f"--device {spec!r} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecPassError(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SpecPassError(f"--device {spec}: specpass runs on cpu or cuda")
    return device


def _load_plan(path: str | None):
    if path is None:
        return None
    from specpass.tune.plan import SpecPlan

    return SpecPlan.load(path)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_methods(spec: str, registry: dict[str, Method]) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SpecPassError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    if len(set(names)) != len(names):
        raise SpecPassError(f"--methods lists a method twice: {spec}")
    if REFERENCE not in names:
        log.warning("adding %s: it is the reference every method is compared with", REFERENCE)
        names.insert(0, REFERENCE)
    return names


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------
def resolve_prompts(path: str | os.PathLike[str] | None) -> Path:
    """``--prompts``, or the Spec-Bench dev split shipped with specpass."""
    if path is None:
        if not _DEFAULT_PROMPTS.is_file():
            raise SpecPassError(
                f"Spec-Bench prompts not found at {_DEFAULT_PROMPTS}: this specpass installation is incomplete "
                "(reinstall it), or pass --prompts PATH, a Spec-Bench question.jsonl"
            )
        return _DEFAULT_PROMPTS
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecPassError(f"--prompts {path}: no such file")
    return p


def load_questions(path: Path) -> list[dict]:
    """Spec-Bench questions: one JSON object a line with question_id, category and a non-empty turns list."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecPassError(f"{path}:{n}: not JSON: {e}") from e
            if not (
                isinstance(q, dict)
                and "question_id" in q
                and isinstance(q.get("category"), str)
                and isinstance(q.get("turns"), list)
                and q["turns"]
                and isinstance(q["turns"][0], str)
            ):
                raise SpecPassError(f"{path}:{n}: expected a question_id, a category and a list of turns")
            questions.append(q)
    if not questions:
        raise SpecPassError(f"{path} holds no questions")
    return questions


def stratified_sample(questions: Sequence[dict], n: int) -> list[dict]:
    """The first n of a round-robin over categories (in order of first appearance), questions in file order."""
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    if n > len(questions):
        log.warning("only %d questions available; running all of them", len(questions))
    sample: list[dict] = []
    depth = 0
    while len(sample) < min(n, len(questions)):
        for qs in by_category.values():
            if depth < len(qs) and len(sample) < n:
                sample.append(qs[depth])
        depth += 1
    return sample


def _graphs_compiled() -> int:
    """How many graphs torch.compile has produced so far in this process (to catch compiles during timing)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])
