"""``specpass bench``'s report: text, Markdown and JSON tables, the machine, the command that reproduces it."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import statistics
from pathlib import Path

import torch

from specpass.bench.compare import NEAR_TIE, NEAR_TIE_ULPS, Results, compare_outputs
from specpass.bench.methods import REFERENCE, BenchConfig
from specpass.errors import SpecPassError

log = logging.getLogger("specpass.bench")


def report(
    args, results: Results, questions, prompts, model, tokenizer, cfg: BenchConfig, prompts_path, lossy=frozenset()
) -> dict:
    """The tables and notes of a run; ``lossy``: methods not meant to give HF's tokens (their differences are
    counted, not failed)."""
    names = results.names
    per_prompt = []
    mismatches = []
    for q, ids, runs in zip(questions, prompts, results.runs, strict=True):
        ref = runs[REFERENCE].out
        entry = {
            "question_id": q["question_id"],
            "category": q["category"],
            "prompt_tokens": ids.shape[1],
            "methods": {},
        }
        for name in names:
            run = runs[name]
            new = run.out.shape[1] - ids.shape[1]
            m = {
                "new_tokens": new,
                "seconds": run.seconds,
                "tokens_per_s": new / run.seconds if run.seconds else 0.0,
                "identical": True,
                "graphs_compiled": run.compiled,
                "tau": run.tau,
            }
            if name == REFERENCE:
                m["new_ids"] = run.out[0, ids.shape[1] :].tolist()
            else:
                diff = compare_outputs(model, ids, ref, run.out)
                if diff is not None:
                    m["identical"] = False
                    m["mismatch"] = diff
                    m["new_ids"] = run.out[0, ids.shape[1] :].tolist()
                    mismatches.append(
                        {"question_id": q["question_id"], "category": q["category"], "method": name, **diff}
                    )
            entry["methods"][name] = m
        per_prompt.append(entry)

    def speed(name: str, entries) -> float:
        tokens = sum(e["methods"][name]["new_tokens"] for e in entries)
        seconds = sum(e["methods"][name]["seconds"] for e in entries)
        return tokens / seconds if seconds else 0.0

    summary = {}
    ref_speed = speed(REFERENCE, per_prompt)

    def mean_tau(name: str) -> float | None:
        taus = [e["methods"][name]["tau"] for e in per_prompt if e["methods"][name]["tau"] is not None]
        return sum(taus) / len(taus) if taus else None

    for name in names:
        own = [m for m in mismatches if m["method"] == name]
        tps = speed(name, per_prompt)
        summary[name] = {
            "tokens_per_s": tps,
            "ratio": tps / ref_speed if ref_speed else 0.0,
            "new_tokens": sum(e["methods"][name]["new_tokens"] for e in per_prompt),
            "seconds": sum(e["methods"][name]["seconds"] for e in per_prompt),
            "setup_s": results.setup_s[name],
            "warm_up_s": results.warm_up_s[name],
            "graphs_compiled_while_timed": sum(e["methods"][name]["graphs_compiled"] for e in per_prompt),
            "identical": not own,
            "lossless": name not in lossy,
            "mismatches": sum(not m["near_tie"] for m in own),
            "near_ties": sum(m["near_tie"] for m in own),
            "tau": mean_tau(name),
            "note": results.notes.get(name, ""),
        }
    repeat_differences = _over_repeats(results, prompts, questions, summary) if len(results.repeats) > 1 else []
    categories = {}
    for cat in dict.fromkeys(q["category"] for q in questions):
        entries = [e for e in per_prompt if e["category"] == cat]
        base = speed(REFERENCE, entries)
        categories[cat] = {
            "prompts": len(entries),
            **{
                n: {"tokens_per_s": speed(n, entries), "ratio": speed(n, entries) / base if base else 0.0}
                for n in names
            },
        }
    failed = any(not m["near_tie"] and m["method"] not in lossy for m in mismatches)
    failed |= any(d["method"] not in lossy for d in repeat_differences)
    machine = machine_info(args.threads, cfg.device)
    command = _command_line(args, cfg, prompts_path)
    data = {
        "command": command,
        "machine": machine,
        "config": {
            "model": args.model,
            "prompts": str(prompts_path),
            "num_prompts": len(questions),
            "max_new_tokens": cfg.max_new_tokens,
            "methods": names,
            "backend": cfg.backend,
            "threads": args.threads,
            "device": str(cfg.device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "max_cache_len": cfg.max_cache_len,
            "repeats": len(results.repeats),
            "near_tie": NEAR_TIE,
            "near_tie_ulps": NEAR_TIE_ULPS,
            "lowbit": _lowbit_info(cfg),
            "operand_order": _order_info(cfg),
        },
        "summary": summary,
        "skipped": dict(results.skipped),
        "categories": categories,
        "mismatches": mismatches,
        "repeat_differences": repeat_differences,
        "prompts": per_prompt,
        "exit_code": 1 if failed else 0,
    }
    tables = _summary_table(names, summary, results.skipped) + "\n\n" + _category_table(names, categories)
    notes = [f"{name}: {summary[name]['note']}" for name in names if summary[name]["note"]]
    if data["config"]["lowbit"]:
        notes.append(_lowbit_note(data["config"]["lowbit"]))
    if data["config"]["operand_order"]:
        notes.append(_order_note(data["config"]["operand_order"]))
    notes += [f"SKIPPED: {name}: {why}" for name, why in results.skipped.items()]
    notes += _mismatch_lines([m for m in mismatches if m["method"] not in lossy], tokenizer)
    notes += [
        f"MISMATCH: {d['method']} on question {d['question_id']}: repeat {d['repeat']} gave other tokens than the first"
        for d in repeat_differences
        if d["method"] not in lossy
    ]
    if len(results.repeats) > 1:
        notes.append(
            f"tokens/s and ratios: the median over {len(results.repeats)} repeats of the prompts; "
            "per-prompt figures and categories: the first repeat"
        )
    for name in sorted(lossy & set(names)):
        differ = len({m["question_id"] for m in mismatches if m["method"] == name})
        notes.append(
            f"{name} is not lossless by design: its output equals hf_eager's on {len(questions) - differ} of "
            f"{len(questions)} prompts (not a failure of the run)"
        )
    for name in names:
        if summary[name]["graphs_compiled_while_timed"]:
            notes.append(
                f"WARNING: {name} compiled {summary[name]['graphs_compiled_while_timed']} graph(s) during "
                "timed runs; its tokens/s include compilation"
            )
    text = tables + ("\n\n" + "\n".join(notes) if notes else "")
    if failed:
        text += "\n\nFAILED: some outputs differ from hf_eager's beyond near-ties of its top-2 logits."
    markdown = _markdown(data, tables, notes)
    return {"json": data, "text": text, "markdown": markdown}


def _over_repeats(results: Results, prompts, questions, summary: dict) -> list[dict]:
    """With several repeats: each method's tokens/s and ratio become the median over the repeats (its
    ``ratios`` kept), and the outputs of later repeats that differ from the first's are returned."""
    differences = []
    per_repeat: dict[str, list[float]] = {n: [] for n in results.names}
    for r, runs in enumerate(results.repeats):
        for name in results.names:
            tokens = sum(run[name].out.shape[1] - ids.shape[1] for run, ids in zip(runs, prompts, strict=True))
            seconds = sum(run[name].seconds for run in runs)
            per_repeat[name].append(tokens / seconds if seconds else 0.0)
            for q, run, first in zip(questions, runs, results.runs, strict=True):
                if r and not torch.equal(run[name].out, first[name].out):
                    differences.append({"question_id": q["question_id"], "method": name, "repeat": r + 1})
    reference = per_repeat[REFERENCE]
    for name in results.names:
        ratios = [tps / ref if ref else 0.0 for tps, ref in zip(per_repeat[name], reference, strict=True)]
        summary[name].update(
            tokens_per_s=statistics.median(per_repeat[name]), ratio=statistics.median(ratios), ratios=ratios
        )
    return differences


def _summary_table(names, summary, skipped: dict[str, str] | None = None) -> str:
    rows = [
        "| method | tokens/s | vs hf_eager | tau | setup s | warm-up s | identical to hf_eager |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        s = summary[name]
        if name == REFERENCE:
            same = "(reference)"
        elif s["mismatches"] and not s.get("lossless", True):
            same = f"no ({s['mismatches']} prompt(s) differ; not lossless)"
        elif s["mismatches"]:
            same = f"**no** ({s['mismatches']} prompt(s) differ)"
        else:
            same = "yes"
        if s["near_ties"]:
            same += f", {s['near_ties']} near-tie(s)"
        tau = "" if s["tau"] is None else f"{s['tau']:.2f}"
        rows.append(
            f"| {name} | {s['tokens_per_s']:.2f} | {s['ratio']:.2f}x | {tau} | {s['setup_s']:.1f} | "
            f"{s['warm_up_s']:.1f} | {same} |"
        )
    for name, why in (skipped or {}).items():
        rows.append(f"| {name} | | | | | | skipped: {_table_cell(why)} |")
    return "\n".join(rows)


def _table_cell(text: str) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _category_table(names, categories) -> str:
    others = [n for n in names if n != REFERENCE]
    rows = [
        "| category | prompts | hf_eager tokens/s | " + " | ".join(f"{n} vs hf_eager" for n in others) + " |",
        "|---|---:|---:|" + "---:|" * len(others),
    ]
    for cat, c in categories.items():
        ratios = " | ".join(f"{c[n]['ratio']:.2f}x" for n in others)
        rows.append(f"| {cat} | {c['prompts']} | {c[REFERENCE]['tokens_per_s']:.2f} | {ratios} |")
    return "\n".join(rows)


def _mismatch_lines(mismatches, tokenizer) -> list[str]:
    def tok(t):
        return "(end)" if t is None else f"{t} {tokenizer.decode([t])!r}"

    lines = []
    for m in sorted(mismatches, key=lambda m: m["near_tie"]):
        what = "near-tie (tolerated)" if m["near_tie"] else "MISMATCH"
        gap = "" if m["hf_top2_gap"] is None else f", HF top-2 logit gap {m['hf_top2_gap']:.2e}"
        if m["hf_top2_gap"] is not None:
            gap += f" (near-tie below {m['near_tie_threshold']:.2e})"
        lines.append(
            f"{what}: {m['method']} on question {m['question_id']} ({m['category']}): first difference at "
            f"new token {m['position']}: hf_eager {tok(m['hf_token'])}, {m['method']} "
            f"{tok(m['method_token'])}{gap}"
        )
    return lines


def _markdown(data, tables: str, notes: list[str]) -> str:
    c, mach = data["config"], data["machine"]
    lines = [
        f"## {_model_label(c['model'])}: {c['num_prompts']} Spec-Bench prompts, {c['max_new_tokens']} new tokens ({mach['date']})",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"- CPU: {mach['cpu']}, {mach.get('isa', '?')} ({mach['logical_cpus']} logical CPUs), "
        f"{mach['threads']} torch threads",
        *([f"- {mach['cpu_level']}"] if mach.get("cpu_level") else []),
        *([f"- GPU: {mach['gpu']}, device {c['device']}"] if mach.get("gpu") else []),
        f"- torch {mach['torch']}, transformers {mach['transformers']}, specpass {mach['specpass']}, "
        f"Python {mach['python']}",
        f"- greedy, batch 1, methods alternating per prompt in one process; max_cache_len {c['max_cache_len']}; "
        f"specpass backend {c['backend']}; {c['dtype']} on {c['device']}",
        "- tokens/s: all new tokens over all timed seconds; tau: mean tokens per verify step, where a method "
        "reports it; setup: method setup (specpass: its compilation; hf_early_exit: its choice of k); "
        "warm-up: untimed first generations (hf_static_compile compiles here)",
        "",
        tables,
        "",
    ]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _lowbit_info(cfg: BenchConfig) -> dict | None:
    """The low-bit kernels specpass ran (ISA level) and what it measured on this CPU, when it used them."""
    sm = cfg.shared.get("spec_model")
    if sm is None or not getattr(sm, "lowbit", None):
        return None
    from specpass.kernels import loaded_isa

    forced = os.environ.get("SPECPASS_KERNEL_ISA")
    return {
        "isa": loaded_isa(),
        "forced": bool(forced),
        "choices": dict(sm.lowbit_choices),
        "exact_lowbit": sm.exact_lowbit,
    }


def _order_info(cfg: BenchConfig) -> dict | None:
    """The fp32 operand order specpass timed on this CPU per shape of weight left in fp32 (kernels/choice.py)."""
    from specpass.kernels.choice import timed_orders

    return timed_orders(getattr(cfg.shared.get("spec_model"), "order_choices", {})) or None


def _order_note(info: dict) -> str:
    from specpass.kernels.choice import summarize_orders

    return f"specpass {summarize_orders(info)}"


def _lowbit_note(info: dict) -> str:
    from specpass.kernels.choice import summarize

    isa = info["isa"] + (" (forced by SPECPASS_KERNEL_ISA)" if info["forced"] else "")
    return f"specpass low-bit kernels: {isa}; {summarize(info['choices'])}"


def _model_label(name: str) -> str:
    from specpass.models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if name == "default" else name


def machine_info(threads: int, device: torch.device | None = None) -> dict:
    import transformers

    import specpass

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from specpass import cpu_level, machine

    return {
        "cpu": cpu,
        "isa": machine.isa_name(),
        "cpu_flags": sorted(machine.cpu_flags()),
        "cpu_level": cpu_level.describe(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specpass": specpass.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
    }


#: the environment that changes what a run measures: the kernels' ISA, the CPU level, the llama.cpp build
_REPRODUCING_ENV = ("SPECPASS_CPU_LEVEL", "SPECPASS_KERNEL_ISA", "LLAMA_CPP_LIB_PATH")


def _command_line(args, cfg: BenchConfig, prompts_path: Path) -> str:
    """The command that reproduces this run, every option spelled out, after the settings it ran under."""
    env = [f"{k}={os.environ[k]}" for k in _REPRODUCING_ENV if os.environ.get(k)]
    parts = ["specpass", "bench", "--model", args.model]
    if args.prompts is not None:
        parts += ["--prompts", str(args.prompts)]
    parts += [
        "--num-prompts",
        str(args.num_prompts),
        "--max-new-tokens",
        str(cfg.max_new_tokens),
        "--methods",
        args.methods,
        "--backend",
        cfg.backend,
        "--threads",
        str(args.threads),
        "--device",
        str(cfg.device),
        *(["--dtype", args.dtype] if args.dtype else []),
        *(["--plan", args.plan] if args.plan else []),
        *(["--gguf", str(args.gguf)] if getattr(args, "gguf", None) else []),
        *(["--no-exact-lowbit"] if getattr(args, "no_exact_lowbit", False) else []),
        *(["--repeats", str(args.repeats)] if getattr(args, "repeats", 1) > 1 else []),
        "--max-cache-len",
        str(cfg.max_cache_len),
    ]
    return shlex.join([*env, *parts])


def write(path: str, text: str) -> None:
    """Write ``text`` whole or not at all: into a temporary file beside ``path``, then renamed over it."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SpecPassError(f"cannot write {path}: {e}") from e
    log.info("wrote %s", path)
