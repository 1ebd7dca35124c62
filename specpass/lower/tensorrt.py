"""TensorRT lowering through Torch-TensorRT's dynamo path (``torch_tensorrt.dynamo.compile``).

The KV cache stays a graph input written in place, and masks are explicit inputs (attention is not
marked causal: tree and chain masks must be honoured). Import-guarded: on a machine without a CUDA GPU or
without torch-tensorrt, asking for this backend is a SpecPassError that says which is missing.
"""

from __future__ import annotations

import logging
import time

import torch

from specpass.errors import SpecPassError
from specpass.program_export import export_program

log = logging.getLogger("specpass.lower")


def require_tensorrt():
    """The torch_tensorrt module, or a SpecPassError naming what is missing."""
    if not torch.cuda.is_available():
        raise SpecPassError(
            "backend 'tensorrt' needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False); "
            "use backend 'inductor' (specpass compile --backend aoti) on this machine"
        )
    try:
        import torch_tensorrt
    except ImportError as e:
        raise SpecPassError(
            f"backend 'tensorrt' needs the torch-tensorrt package built for torch {torch.__version__} ({e}); "
            "install it, or use backend 'inductor'"
        ) from e
    return torch_tensorrt


def lower_tensorrt(gm: torch.fx.GraphModule, example_args: tuple, dynamic_shapes: tuple, name: str):
    """Re-export the rewritten program and compile it with Torch-TensorRT; returns the compiled module."""
    trt = require_tensorrt()
    if any(isinstance(a, torch.Tensor) and a.device.type != "cuda" for a in example_args):
        raise SpecPassError("backend 'tensorrt' needs the model on a CUDA device: model.to('cuda') first")
    t0 = time.perf_counter()
    try:
        exported = export_program(gm, example_args, dynamic_shapes)
        with torch.no_grad():
            compiled = trt.dynamo.compile(exported, arg_inputs=list(example_args), min_block_size=1)
    except SpecPassError:
        raise
    except Exception as e:  # noqa: BLE001 - say which program failed and why, not a converter trace
        raise SpecPassError(f"program '{name}' could not be compiled by Torch-TensorRT: {type(e).__name__}: {e}") from e
    log.info("compiled program %s with Torch-TensorRT in %.1fs", name, time.perf_counter() - t0)
    return compiled
