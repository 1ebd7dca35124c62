"""Run graph passes with the invariants every pass relies on (lint, dead-code elimination, recompile)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from specpass.errors import SpecPassError
from specpass.program_export import quiet_compile

log = logging.getLogger("specpass.passes")


@dataclasses.dataclass(frozen=True)
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    n_matches: int


Pass = Callable[[torch.fx.GraphModule, Any, Any], PassResult]


def clone_graph_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict]:
    """A new GraphModule with its own graph that shares gm's parameters (no weight copy).

    Also returns the old -> new node map, so that annotations of gm (a Structure) can follow the copy.
    """
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    with quiet_compile():  # copying the codegen's treespecs trips torch's own pytree deprecation warning
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    node_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, node_map, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    with quiet_compile():
        new.meta = copy.deepcopy(getattr(gm, "meta", {}))
    return new, node_map


def remap(obj: Any, node_map: dict) -> Any:
    """``obj`` (nodes, lists, dataclasses of them) with every fx.Node replaced by its copy."""
    if isinstance(obj, torch.fx.Node):
        return node_map[obj]
    if isinstance(obj, list):
        return [remap(x, node_map) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: remap(getattr(obj, f.name), node_map) for f in dataclasses.fields(obj)}
        )
    return obj


def attr_of(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node's ``target`` names on ``gm``."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def tag(node: torch.fx.Node, pass_name: str, anchor: torch.fx.Node | None = None) -> None:
    """Mark a node a pass created, with its anchor's module stack so structure lookups still work."""
    node.meta["specpass"] = {"pass": pass_name}
    if anchor is not None and "nn_module_stack" in anchor.meta:
        node.meta["nn_module_stack"] = dict(anchor.meta["nn_module_stack"])


def run_passes(
    gm: torch.fx.GraphModule,
    passes: Sequence[Pass],
    structure: Any,
    cfg: Any = None,
    observe: Callable[[str, torch.fx.GraphModule, PassResult], None] | None = None,
) -> torch.fx.GraphModule:
    """Apply passes in order to a copy of gm; record each result in ``gm.meta["specpass"]["history"]``.

    ``observe(pass name, graph module, result)`` runs after each pass (graph snapshots: specpass/snapshot.py).
    """
    gm, node_map = clone_graph_module(gm)
    structure = remap(structure, node_map)
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
        if observe is not None:
            observe(name, gm, result)
    return gm


def erase_unused(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]) -> int:
    """Erase those of ``nodes`` that nothing uses any more, side-effecting ones (KV writes) included.

    ``eliminate_dead_code`` keeps in-place ops such as a removed layer's ``index_copy_`` into its KV input;
    a pass that removes a layer knows those writes are dead (the verify program writes the same slots).
    """
    erased = 0
    pending = set(nodes)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node in pending and not node.users:
                gm.graph.erase_node(node)
                pending.discard(node)
                erased += 1
                changed = True
    return erased
