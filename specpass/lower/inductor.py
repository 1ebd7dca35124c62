"""TorchInductor lowering: one ``torch.compile(fullgraph=True)`` per program."""

from __future__ import annotations

import torch


def lower_inductor(gm: torch.fx.GraphModule, *, dynamic: bool):
    # Static shapes for the one-token decode program let Inductor specialise every kernel; prefill sees a
    # new prompt length each call, so it is compiled once with a symbolic length instead of per length.
    return torch.compile(gm, fullgraph=True, dynamic=dynamic)
