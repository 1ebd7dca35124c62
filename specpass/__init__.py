"""specpass: a compiler for lossless self-speculative decoding of Hugging Face causal LMs."""

from specpass.capture import CacheSpec, CapturedGraph, Structure, capture
from specpass.errors import SpecPassError
from specpass.optimize import SpecModel, optimize
from specpass.tune.calibrate import calibrate
from specpass.tune.plan import SpecPlan

__version__ = "0.1.0"

__all__ = [
    "CacheSpec",
    "CapturedGraph",
    "SpecModel",
    "SpecPassError",
    "SpecPlan",
    "Structure",
    "calibrate",
    "capture",
    "optimize",
]
