"""Many architectures of ``specpass coverage``, each checked in a worker process with a time limit: a hang or a
segfault costs one result, not the report."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

from specpass.coverage.check import CRASH, CoverageResult, check_architecture, first_line

TIMEOUT_S = 120.0


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieter output is a nicety
        pass


def _worker(conn: Connection, threads: int) -> None:
    """Worker process: receive model types, send back CoverageResult dicts, until None arrives."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    # Modeling code prints; the report is the only output (a crash still shows as the worker's exit code).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import torch

    torch.set_num_threads(threads)
    _quiet()
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        try:
            res = check_architecture(model_type)
        except BaseException as e:  # noqa: BLE001 - check_architecture classifies; this is a last resort
            res = CoverageResult(model_type, CRASH, f"coverage harness: {first_line(e)}")
        conn.send(res.to_json())


class _Slot:
    """One worker process and the architecture it is working on."""

    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.task: str | None = None
        self.started = 0.0

    def give(self, model_type: str) -> None:
        self.task, self.started = model_type, time.monotonic()
        self.conn.send(model_type)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_architectures(
    model_types: Sequence[str],
    *,
    workers: int = 2,
    timeout_s: float = TIMEOUT_S,
    on_result: Callable[[CoverageResult], None] | None = None,
) -> list[CoverageResult]:
    """check_architecture for each model type in ``workers`` processes; a hang or crash costs one result."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(model_types)
    results: dict[str, CoverageResult] = {}
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    slots = [_Slot(ctx, threads) for _ in range(max(1, min(workers, len(pending))))]

    def finish(slot: _Slot, res: CoverageResult) -> None:
        results[res.model_type] = res
        slot.task = None
        if on_result is not None:
            on_result(res)

    try:
        for slot in slots:
            if pending:
                slot.give(pending.pop(0))
        while any(s.task is not None for s in slots):
            busy = [s for s in slots if s.task is not None]
            deadline = min(s.started + timeout_s for s in busy)
            ready = wait(
                [s.conn for s in busy] + [s.proc.sentinel for s in busy], max(0.0, deadline - time.monotonic())
            )
            for i, slot in enumerate(slots):
                if slot.task is None:
                    continue
                task = slot.task
                if slot.conn in ready or slot.conn.poll():
                    try:
                        finish(slot, CoverageResult(**slot.conn.recv()))
                    except (EOFError, OSError):
                        pass
                if slot.task is None:
                    pass
                elif not slot.proc.is_alive():
                    code = slot.proc.exitcode
                    finish(slot, CoverageResult(task, CRASH, f"worker process died (exit code {code})"))
                    slot.stop()
                    slots[i] = slot = _Slot(ctx, threads)
                elif time.monotonic() - slot.started > timeout_s:
                    finish(slot, CoverageResult(task, CRASH, f"timed out after {timeout_s:.0f}s"))
                    slot.proc.kill()
                    slot.stop()
                    slots[i] = slot = _Slot(ctx, threads)
                if slot.task is None and pending:
                    slot.give(pending.pop(0))
    finally:
        for slot in slots:
            slot.stop()
    return [results[m] for m in model_types if m in results]
