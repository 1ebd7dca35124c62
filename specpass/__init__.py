"""specpass: a compiler for lossless self-speculative decoding of Hugging Face causal LMs.

``import specpass`` imports torch but not transformers: ``specpass run`` and ``specpass.load_engine`` must
not load transformers' modeling code. ``calibrate`` (which needs it) loads on first use.
"""

# ruff: noqa: E402 (the level is applied before torch is imported)
from __future__ import annotations

from specpass import cpu_level

cpu_level.apply()  # before torch is imported: ATen, MKL and oneDNN read their ISA settings once

import torch

from specpass.cache_spec import CacheSpec
from specpass.capture import CapturedGraph, capture
from specpass.engine import Engine, load_engine, write_engine
from specpass.errors import SpecPassError
from specpass.optimize import SpecModel, optimize
from specpass.structure import Structure
from specpass.tune.plan import SpecPlan
from specpass.version import __version__ as __version__

cpu_level.check_torch(torch.backends.cpu.get_cpu_capability())

__all__ = [
    "CacheSpec",
    "CapturedGraph",
    "Engine",
    "SpecModel",
    "SpecPassError",
    "SpecPlan",
    "Structure",
    "calibrate",
    "capture",
    "load_engine",
    "models",
    "optimize",
    "write_engine",
]


def __getattr__(name: str):
    if name == "calibrate":
        from specpass.tune.calibrate import calibrate

        return calibrate
    if name == "models":  # loads transformers: imported on first use, like calibrate
        import specpass.models

        return specpass.models
    raise AttributeError(f"module 'specpass' has no attribute {name!r}")
