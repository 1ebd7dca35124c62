"""``specpass bench``: specpass against HF baselines on Spec-Bench prompts, side by side in one process.

Protocol (Spec-Bench's): greedy decoding, batch 1, the first turn of each question in the model's chat template,
a stratified sample of the questions (round-robin over the categories in file order). Every method generates
every prompt, and the methods alternate per prompt, in an order rotated from one prompt to the next, so that
a slow patch of a shared machine hits all of them alike. Each method stops at eos on its own; a lossless
method produces HF eager's tokens anyway, and the bench checks that it does: a difference that is not a
near-tie of HF's own top-2 logits fails the run (exit code 1).

``methods.py`` sets up each method (HF's baselines, the peers, specpass), ``runner.py`` runs them and compares
their tokens, ``report.py`` writes the tables.
"""

from specpass.bench.compare import NEAR_TIE, NEAR_TIE_ULPS, compare_outputs, near_tie_threshold
from specpass.bench.methods import (
    DEFAULT_METHODS,
    METHODS,
    REFERENCE,
    BenchConfig,
    Method,
    MethodUnavailable,
    Runner,
    early_exit_candidates,
)
from specpass.bench.report import machine_info
from specpass.bench.runner import (
    DTYPES,
    add_arguments,
    bench_device,
    load_questions,
    resolve_prompts,
    run_bench,
    stratified_sample,
)

__all__ = [
    "DEFAULT_METHODS",
    "DTYPES",
    "METHODS",
    "NEAR_TIE",
    "NEAR_TIE_ULPS",
    "REFERENCE",
    "BenchConfig",
    "Method",
    "MethodUnavailable",
    "Runner",
    "add_arguments",
    "bench_device",
    "compare_outputs",
    "early_exit_candidates",
    "load_questions",
    "machine_info",
    "near_tie_threshold",
    "resolve_prompts",
    "run_bench",
    "stratified_sample",
]
