"""Run graph passes with the invariants every pass relies on (lint, dead-code elimination, recompile)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from specpass.errors import SpecPassError

log = logging.getLogger("specpass.passes")


@dataclasses.dataclass(frozen=True)
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    n_matches: int


Pass = Callable[[torch.fx.GraphModule, Any, Any], PassResult]


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph that shares gm's parameters (no weight copy)."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta = copy.deepcopy(getattr(gm, "meta", {}))
    return new


def tag(node: torch.fx.Node, pass_name: str, anchor: torch.fx.Node | None = None) -> None:
    """Mark a node a pass created, with its anchor's module stack so structure lookups still work."""
    node.meta["specpass"] = {"pass": pass_name}
    if anchor is not None and "nn_module_stack" in anchor.meta:
        node.meta["nn_module_stack"] = dict(anchor.meta["nn_module_stack"])


def run_passes(
    gm: torch.fx.GraphModule, passes: Sequence[Pass], structure: Any, cfg: Any = None
) -> torch.fx.GraphModule:
    """Apply passes in order to a copy of gm; record each result in ``gm.meta["specpass"]["history"]``."""
    gm = clone_graph_module(gm)
    history = gm.meta.setdefault("specpass", {}).setdefault("history", [])
    done: list[str] = []
    for p in passes:
        name = p.__name__
        try:
            result = p(gm, structure, cfg)
            gm = result.gm
            if result.modified:
                gm.graph.eliminate_dead_code()
                gm.graph.lint()
                gm.recompile()
        except SpecPassError as e:
            raise SpecPassError(f"pass {name} failed after {done}: {e}") from e
        except Exception as e:  # noqa: BLE001 - name the failing pass, keep the cause chained
            raise SpecPassError(f"pass {name} failed after {done}: {type(e).__name__}: {e}") from e
        history.append({"pass": name, "modified": result.modified, "n_matches": result.n_matches})
        log.debug("pass %s: %d matches", name, result.n_matches)
        done.append(name)
    return gm
