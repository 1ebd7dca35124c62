"""Graph snapshots: what specpass compiles for a model, as text a CI job can keep and check.

``take`` captures a model and runs every pass pipeline its plan needs, as ``optimize()`` would, but lowers
nothing: the result is the normalized text (graph_text.py) of the captured graph, of each program after every
pass that changed it, and of each program's calling convention, plus a report (``report.json``): per program
the passes applied with their node and op counts before and after, the weights read as low-bit blocks (format,
blocks kept in fp32, bytes), the plan, the low-bit/fp32 choice per kind of call and the fp32 operand order per
shape of weight (kernels/choice.py), and the weight bytes a decode step reads. ``compare`` says what changed
between two snapshots and at which pass it changed first.

A snapshot is a directory::

    report.json                        compared, except its "recorded" entry (versions, machine, timings)
    plan.json                          the SpecPlan it was taken with (absent: plain decoding)
    graphs/capture.txt                 the captured graph
    graphs/<program>/<k>-<pass>.txt    the program after its k-th pass (only passes that changed the graph)
    graphs/<program>/signature.txt     the calling convention of the program that would be lowered

The low-bit/fp32 choice and the fp32 order are measured on the machine that takes the first snapshot; a check
takes the snapshot's choices as given (``kernels.choice.use_choices``), so that it times nothing and needs no
kernel build: the same answer on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from specpass.capture import capture
from specpass.errors import SpecPassError
from specpass.graph_text import normalize, op_counts, signature
from specpass.kernels import choice
from specpass.output_paths import check_output_location
from specpass.passes import PIPELINES, run_passes, with_options
from specpass.passes.exact_lowbit import packing
from specpass.passes.manager import attr_of
from specpass.programs import draft_programs
from specpass.tune.plan import SpecPlan

#: the snapshot format; a snapshot of another version is refused (take a new one with --update)
VERSION = 1
REPORT = "report.json"
PLAN = "plan.json"
GRAPHS = "graphs"
CAPTURE = f"{GRAPHS}/capture.txt"
#: the report's entry that is written but never compared (it differs between machines and installs)
RECORDED = "recorded"
_EMBEDDINGS = {torch.ops.aten.embedding.default, torch.ops.specpass.lowbit_embedding.default}


@dataclasses.dataclass
class Snapshot:
    files: dict[str, str]  # path inside the snapshot -> text (graphs and signatures)
    report: dict
    plan: SpecPlan | None


@dataclasses.dataclass
class Change:
    """What differs in one part of two snapshots: a program, the captured graph, or the report."""

    what: str  # "program decode", "captured graph", "report.json"
    first: str  # where it changed first: a pass ("pass exact_lowbit (2 of 3)"), "added", "removed", ...
    diff: list[str]  # unified diff lines


def take(
    model: nn.Module,
    *,
    plan: SpecPlan | None = None,
    max_cache_len: int | None = None,
    exact_lowbit: bool = True,
    choices: dict[str, bool] | None = None,
) -> Snapshot:
    """Capture ``model`` and run the pass pipelines of plain decoding and of ``plan``'s drafts (None: plain
    decoding only). ``choices``: the low-bit/fp32 choice per kind of call to take as given (a snapshot's);
    None measures it on this CPU, as ``optimize()`` does."""
    if plan is not None:
        plan.check(model)
    for p in model.parameters():
        p.requires_grad_(False)
    captured = capture(model, max_cache_len=max_cache_len)
    device = next(model.parameters()).device
    files = {CAPTURE: normalize(captured.gm)}
    programs: dict[str, dict] = {}
    matrices: dict[str, dict] = {}
    chosen: dict[str, bool] = {}
    timings: dict[str, dict] = {}
    captured_ops = op_counts(captured.gm)
    given = choice.use_choices(choices) if choices is not None else contextlib.nullcontext()
    with given, packing({}), torch.no_grad():
        for name, (pipeline, cfg) in program_pipelines(plan, device, captured.spec.dtype).items():
            pipeline = with_options(pipeline, exact_lowbit=exact_lowbit)
            stages: list[dict] = []
            before = [captured_ops, len(captured.gm.graph.nodes)]

            def observe(pass_name, gm, result, name=name, stages=stages, before=before):
                ops = op_counts(gm)
                changed = {op: [before[0].get(op, 0), ops.get(op, 0)] for op in sorted(set(ops) | set(before[0]))}
                stages.append(
                    {
                        "pass": pass_name,
                        "modified": result.modified,
                        "matches": result.n_matches,
                        "nodes": [before[1], len(gm.graph.nodes)],
                        "ops": {op: n for op, n in changed.items() if n[0] != n[1]},
                    }
                )
                if result.modified:
                    files[_stage_file(name, len(stages), pass_name)] = normalize(gm)
                before[:] = [ops, len(gm.graph.nodes)]

            gm = run_passes(captured.gm, pipeline, captured.structure, cfg, observe)
            files[f"{GRAPHS}/{name}/signature.txt"] = signature(gm)
            found = gm.meta["specpass"]
            matrices.update(found.get("exact_lowbit", {}))
            for result in found.get("lowbit_choices", {}).values():
                chosen[result["kind"]] = result["lowbit"]
                if result.get("lowbit_ms") is not None:
                    timings[result["kind"]] = {"kernel_ms": result["lowbit_ms"], "fp32_ms": result["fp32_ms"]}
            for result in found.get("operand_order", {}).values():  # "order|..." kinds: W @ x.T (True) or linear
                chosen[result["kind"]] = result["stationary"]
                if result.get("linear_ms") is not None:
                    timings[result["kind"]] = {
                        "linear_ms": result["linear_ms"],
                        "stationary_ms": result["stationary_ms"],
                    }
            programs[name] = {
                "passes": stages,
                "nodes": len(gm.graph.nodes),
                "lowbit_calls": len(found.get("lowbit_calls", [])),
            }
            if name == "decode":
                decode_bytes = weight_bytes_per_step(gm)
    report = {
        "snapshot": VERSION,
        "model": _model_info(model),
        "options": {"max_cache_len": captured.spec.max_cache_len, "exact_lowbit": bool(exact_lowbit)},
        "plan": "plain decoding" if plan is None else plan.describe(),
        "programs": programs,
        "lowbit": {"choices": dict(sorted(chosen.items())), "matrices": dict(sorted(matrices.items()))},
        "decode_weight_bytes_per_step": decode_bytes,
        RECORDED: _recorded(timings),
    }
    return Snapshot(files, report, plan)


def program_pipelines(plan: SpecPlan | None, device=None, dtype=None) -> dict[str, tuple]:
    """The programs ``optimize()`` builds for ``plan`` (None: plain decoding): name -> (passes, DraftConfig)."""
    programs = {"prefill": (PIPELINES["prefill"], None), "decode": (PIPELINES["decode"], None)}
    if plan is None or not plan.speculate:
        return programs
    if plan.tree_budget:
        programs["verify"] = (PIPELINES["verify"], None)  # programs.check_tree_verify's proof
    for name, (pipeline, cfg, _) in draft_programs(plan, device, dtype).items():
        programs[name] = (pipeline, cfg)
    return programs


def weight_bytes_per_step(gm: torch.fx.GraphModule) -> int:
    """The bytes of weights one token's pass through ``gm`` reads: every constant it reads, but one row of an
    embedding table that only lookups read."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = attr_of(gm, node.target)
        if not isinstance(t, torch.Tensor):
            continue
        nbytes = t.numel() * t.element_size()
        lookups = node.users and all(u.op == "call_function" and u.target in _EMBEDDINGS for u in node.users)
        rows = t.shape[0] if lookups and t.dim() == 2 and not _is_exception_table(node) else 1
        total += nbytes // max(rows, 1)
    return total


def _is_exception_table(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a low-bit embedding's list of fp32 blocks (read whole, not by row)."""
    return any(u.target is torch.ops.specpass.lowbit_embedding.default and u.args.index(node) >= 4 for u in node.users)


def _stage_file(program: str, k: int, pass_name: str) -> str:
    return f"{GRAPHS}/{program}/{k:02d}-{pass_name}.txt"


def _model_info(model: nn.Module) -> dict:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _recorded(timings: dict) -> dict:
    import transformers

    from specpass import machine
    from specpass.kernels import kernel_isa
    from specpass.version import __version__

    return {
        "versions": {
            "specpass": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {"cpu": machine.cpu_model(), "isa": machine.isa_name(), "kernels": kernel_isa()},
        "lowbit_timings": dict(sorted(timings.items())),
    }


# --------------------------------------------------------------------------------------------------------
# On disk
# --------------------------------------------------------------------------------------------------------
def write(snapshot: Snapshot, path: str | os.PathLike[str]) -> None:
    """Write ``snapshot`` as the directory ``path``, replacing a snapshot there; a reader sees the old snapshot
    or the new one, never a mix. A directory there that is not a snapshot is refused, not overwritten."""
    path = writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp"))
    old = None
    try:
        for name, text in snapshot.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(snapshot.report, indent=1) + "\n", encoding="utf-8")
        if snapshot.plan is not None:
            (tmp / PLAN).write_text(snapshot.plan.to_json() + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}-{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        if old is not None and not path.exists():
            os.replace(old, path)
            old = None
        raise SpecPassError(f"cannot write the snapshot {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def writable(path: str | os.PathLike[str]) -> Path:
    """``path`` if a snapshot may be written there: nothing, an empty directory or a snapshot (replaced)."""
    path = check_output_location(path, "the snapshot")
    if path.exists() and not (path.is_dir() and ((path / REPORT).is_file() or not any(path.iterdir()))):
        raise SpecPassError(f"{path} exists and is not a specpass graph snapshot: pass a new directory")
    return path


def read(path: str | os.PathLike[str]) -> Snapshot:
    """The snapshot in directory ``path``; a SpecPassError if there is none."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SpecPassError(f"{path}: no such snapshot directory (create one with `specpass graphs MODEL -o {path}`)")
    try:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecPassError(f"{path} is not a specpass graph snapshot: it has no {REPORT}") from None
    except (OSError, ValueError) as e:
        raise SpecPassError(f"{path / REPORT} cannot be read as JSON: {e}") from e
    if not isinstance(report, dict) or report.get("snapshot") != VERSION:
        raise SpecPassError(f"{path} is not a specpass graph snapshot of version {VERSION}: take a new one (--update)")
    plan = SpecPlan.load(path / PLAN) if (path / PLAN).is_file() else None
    files = {
        p.relative_to(path).as_posix(): p.read_text(encoding="utf-8") for p in sorted(path.glob(f"{GRAPHS}/**/*.txt"))
    }
    return Snapshot(files, report, plan)


def check(
    model: nn.Module,
    old: Snapshot,
    *,
    plan: SpecPlan | None | str = "snapshot",
    max_cache_len: int | None = None,
    exact_lowbit: bool = True,
) -> tuple[Snapshot, list[Change]]:
    """Take ``model``'s graphs again as ``old`` was taken and compare: ``old``'s plan (unless ``plan`` is another
    or None), cache size (unless ``max_cache_len``), low-bit option (``exact_lowbit=False`` turns it off) and
    low-bit choices (never timed). Returns the new snapshot and what changed."""
    options = old.report.get("options", {})
    new = take(
        model,
        plan=old.plan if plan == "snapshot" else plan,
        max_cache_len=max_cache_len or options.get("max_cache_len"),
        exact_lowbit=bool(options.get("exact_lowbit", True)) and exact_lowbit,
        choices=dict(old.report.get("lowbit", {}).get("choices", {})),
    )
    return new, compare(old, new)


# --------------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------------
def compare(old: Snapshot, new: Snapshot, *, context: int = 3) -> list[Change]:
    """What differs between two snapshots: the captured graph, each program (the diff of the first of its stages
    whose text changed: a pass's output, or its signature), and the report's compared entries."""
    changes = []
    if old.files.get(CAPTURE) != new.files.get(CAPTURE):
        changes.append(
            Change("captured graph", "capture", _diff(old.files.get(CAPTURE), new.files.get(CAPTURE), CAPTURE, context))
        )
    old_programs, new_programs = old.report.get("programs", {}), new.report.get("programs", {})
    for name in [*old_programs, *(n for n in new_programs if n not in old_programs)]:
        if name not in new_programs:
            changes.append(Change(f"program {name}", "removed (the plan no longer builds it)", []))
            continue
        if name not in old_programs:
            changes.append(Change(f"program {name}", "added (the plan now builds it)", []))
            continue
        change = _first_change(name, old, new, context)
        if change is not None:
            changes.append(change)
    a, b = _compared_lines(old.report), _compared_lines(new.report)
    if a != b:
        changes.append(Change(REPORT, "its compared entries", _diff(a, b, REPORT, context)))
    return changes


def _stages(snapshot: Snapshot, name: str) -> list[tuple[str, str]]:
    """(pass, the program's text after it) for every pass of ``name``'s pipeline, an unmodifying pass carrying
    the text before it."""
    text = snapshot.files.get(CAPTURE, "")
    stages = []
    for k, stage in enumerate(snapshot.report["programs"][name].get("passes", []), 1):
        text = snapshot.files.get(_stage_file(name, k, stage["pass"]), text)
        stages.append((stage["pass"], text))
    return stages


def _first_change(name: str, old: Snapshot, new: Snapshot, context: int) -> Change | None:
    a, b = _stages(old, name), _stages(new, name)
    for k in range(max(len(a), len(b))):
        pa, ta = a[k] if k < len(a) else (None, "")
        pb, tb = b[k] if k < len(b) else (None, "")
        if pa != pb:
            where = f"the pipeline: pass {k + 1} was {pa or '(none)'}, is now {pb or '(none)'}"
            return Change(f"program {name}", where, _diff(ta, tb, f"{name} after pass {k + 1}", context))
        if ta != tb:
            return Change(
                f"program {name}",
                f"the output of pass {pa} ({k + 1} of {len(b)})",
                _diff(ta, tb, _stage_file(name, k + 1, pa), context),
            )
    sig = f"{GRAPHS}/{name}/signature.txt"
    if old.files.get(sig) != new.files.get(sig):
        return Change(f"program {name}", "its signature", _diff(old.files.get(sig), new.files.get(sig), sig, context))
    return None


def _compared_lines(report: dict) -> str:
    """The report without its recorded entry, as one ``path: value`` line per leaf (so a diff names the key)."""
    lines: list[str] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            lines.append(f"{prefix}: {json.dumps(value)}")

    walk("", {k: v for k, v in report.items() if k != RECORDED})
    return "".join(line + "\n" for line in lines)


def _diff(a: str | None, b: str | None, name: str, context: int) -> list[str]:
    return list(
        difflib.unified_diff(
            (a or "").splitlines(),
            (b or "").splitlines(),
            f"snapshot/{name}",
            f"now/{name}",
            n=context,
            lineterm="",
        )
    )


def render(changes: list[Change], *, max_lines: int = 400) -> str:
    """The changes as text: per part, where it changed first and its diff (each cut at ``max_lines`` lines)."""
    out = []
    for c in changes:
        out.append(f"{c.what}: changed first in {c.first}")
        lines = c.diff if max_lines <= 0 else c.diff[:max_lines]
        out += lines
        if len(lines) < len(c.diff):
            out.append(f"... {len(c.diff) - len(lines)} more diff lines (--max-diff-lines 0 shows all)")
    return "\n".join(out)
