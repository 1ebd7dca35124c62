"""Options and help texts the subcommands share, defined once (demo, tune, bench, compile, graphs)."""

from __future__ import annotations

import argparse

from specpass.errors import SpecPassError
from specpass.lower import BACKENDS

MODEL_HELP = (
    "'default' (SmolLM2-135M-Instruct), another bundled model ('gemma-3-270m'), a local model directory, or a "
    "Hugging Face Hub id"
)

EXACT_LOWBIT_HELP = (
    "keep every weight in fp32: do not read weights that lie exactly on a quantization grid (a GGUF model's) as "
    "their blocks (the exact_lowbit pass; lossless either way)"
)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend``: how specpass lowers its programs (demo, tune, bench)."""
    parser.add_argument(
        "--backend", default="inductor", choices=BACKENDS, help="specpass lowering backend (default: %(default)s)"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's threads for every method of a run (demo, tune, bench); by default torch's own choice
    (one per physical core), the same for every command."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (torch.set_num_threads; default: torch's choice, one per physical core)",
    )


def apply_threads(threads: int | None) -> int:
    """Set ``--threads`` (None: leave torch's choice); return the number of threads torch now uses."""
    import torch

    if threads is not None:
        if threads < 1:
            raise SpecPassError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
