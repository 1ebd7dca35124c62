"""Normalized graph text: one line per node, identical across runs, processes and machines.

Goldens (``tests/goldens/``) and the pass manager's debug dumps use it. A line reads::

    %linear_3 = aten.linear.default(%mul_4, %model.model.layers.0.self_attn.q_proj.weight) : f32[1, s0, 32]  # model.model.layers.0.self_attn.q_proj
    %slice_9 = aten.slice.Tensor(%to_12, 1, -1, 9223372036854775807) : f32[1, 1, 32]  # model.lm_head  [pass=last_token_logits]

What makes it stable:
- names are recomputed from scratch: placeholders keep their (user-facing) names, ``get_attr`` nodes are
  named by the attribute they read, every other node is ``<op>_<k>`` with k counting that op in graph order.
  FX's own names carry counters from deleted or renamed nodes; these do not, and inserting one node only
  renames later nodes of the same op, so golden diffs stay local;
- symbolic sizes are renamed ``s0, s1, ...`` in order of first appearance (export numbers them by its own
  internal counters). Their ranges are not printed: the graph's shape environment holds tracing-time
  ranges (``[2, ...]``), the true ones live in the ExportedProgram's ``range_constraints``;
- nothing else from ``node.meta`` is read: no stack traces (file paths), no ``from_node``, no ids.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

__all__ = ["normalize", "op_counts", "signature", "summary"]

_DTYPES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
}

# Keys torch.export puts in nn_module_stack for nodes that belong to no module.
_NO_MODULE = re.compile(r"^_empty_nn_module_stack")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def normalize(gm: fx.GraphModule | fx.Graph) -> str:
    """The normalized text of ``gm``'s graph (see the module docstring); ends with a newline."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    printer = _Printer(graph)
    return "".join(printer.line(node) + "\n" for node in graph.nodes)


def signature(gm: fx.GraphModule) -> str:
    """The program's calling convention, normalized: one ``name: dtype[shape]`` line per input, then the output."""
    printer = _Printer(gm.graph)
    lines = [f"{printer.names[n]}: {printer.val(n.meta.get('val'))}" for n in gm.graph.nodes if n.op == "placeholder"]
    out = gm.graph.output_node().args[0]
    vals = fx.node.map_arg(out, lambda n: n.meta.get("val"))
    lines.append(f"-> {printer.val(vals)}")
    return "".join(line + "\n" for line in lines)


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes call each op (``aten.linear.default``, ``module.<name>``), sorted by op."""
    ops: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module"):
            key = _target(node) if node.op == "call_function" else f"module.{node.target}"
            ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items()))


def summary(gm: fx.GraphModule) -> dict:
    """What ``specpass inspect`` shows of a program: node and op counts, signature, pass history."""
    return {
        "nodes": len(gm.graph.nodes),
        "ops": op_counts(gm),
        "signature": signature(gm).splitlines(),
        "passes": list(gm.meta.get("specpass", {}).get("history", [])),
    }


class _Printer:
    def __init__(self, graph: fx.Graph):
        self.names: dict[fx.Node, str] = {}
        self.symbols: dict[Any, str] = {}  # sympy symbol -> stable name
        counts: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                name = node.name
            elif node.op == "get_attr":
                name = str(node.target)
            elif node.op == "output":
                name = "output"
            else:
                base = _op_base(node)
                k = counts.get(base, 0)
                counts[base] = k + 1
                name = f"{base}_{k}"
            self.names[node] = name
            # Number the symbols in graph order, before any line is printed.
            self._collect(node.meta.get("val"))

    # ---- symbols ----------------------------------------------------------------------------------------
    def _collect(self, val: Any) -> None:
        if isinstance(val, (list, tuple)):
            for v in val:
                self._collect(v)
        elif isinstance(val, torch.Tensor):
            for d in val.shape:
                self._collect(d)
        elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            expr = val.node.expr
            for sym in sorted(expr.free_symbols, key=str):
                if sym not in self.symbols:
                    self.symbols[sym] = f"s{len(self.symbols)}"

    def sym(self, value: Any) -> str:
        expr = value.node.expr
        self._collect(value)
        renamed = expr.xreplace({s: _sympy_symbol(self.symbols[s]) for s in expr.free_symbols})
        return str(renamed)

    # ---- values -------------------------------------------------------------------------------------------
    def val(self, val: Any) -> str | None:
        if val is None:
            return None
        if isinstance(val, torch.Tensor):
            dims = ", ".join(self.sym(d) if isinstance(d, torch.SymInt) else str(d) for d in val.shape)
            return f"{_DTYPES.get(val.dtype, str(val.dtype).removeprefix('torch.'))}[{dims}]"
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return f"sym({self.sym(val)})"
        if isinstance(val, (list, tuple)):
            inner = ", ".join(self.val(v) or "None" for v in val)
            return f"({inner})" if isinstance(val, tuple) else f"[{inner}]"
        if isinstance(val, (bool, int, float)):
            return repr(val)
        return type(val).__name__

    def arg(self, a: Any) -> str:
        if isinstance(a, fx.Node):
            return "%" + self.names[a]
        if isinstance(a, tuple):
            inner = ", ".join(self.arg(x) for x in a)
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, list):
            return "[" + ", ".join(self.arg(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{self.arg(k)}: {self.arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.sym(a)
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, torch.device):
            return f"device({a.type})"
        if isinstance(a, (torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, slice):
            return f"slice({self.arg(a.start)}, {self.arg(a.stop)}, {self.arg(a.step)})"
        if isinstance(a, torch.Tensor):  # a constant baked into the graph: its shape, never its storage
            return f"tensor({self.val(a)})"
        if a is None or isinstance(a, (bool, int, float, str)):
            return repr(a)
        return _ADDRESS.sub("", type(a).__name__)

    # ---- lines --------------------------------------------------------------------------------------------
    def line(self, node: fx.Node) -> str:
        name = self.names[node]
        if node.op == "output":
            return f"return {self.arg(node.args[0])}"
        if node.op == "placeholder":
            head = f"%{name} = placeholder"
        elif node.op == "get_attr":
            head = f"%{name} = get_attr"
        else:
            args = [self.arg(a) for a in node.args]
            args += [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()]
            head = f"%{name} = {_target(node)}({', '.join(args)})"
        val = self.val(node.meta.get("val"))
        if val is not None:
            head += f" : {val}"
        notes = []
        module = _module_path(node)
        if module:
            notes.append(module)
        tag = node.meta.get("specpass")
        tag = tag.get("pass") if isinstance(tag, dict) else None
        if tag:
            notes.append(f"[pass={tag}]")
        return head + ("  # " + "  ".join(notes) if notes else "")


def _op_base(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.name.split("::")[-1]
        if isinstance(t, torch._ops.OpOverloadPacket):
            return t._qualified_op_name.split("::")[-1]
        if isinstance(t, torch._ops.HigherOrderOperator):
            return t.name()
        return getattr(t, "__name__", type(t).__name__).strip("_") or "fn"
    return re.sub(r"\W", "_", str(t)).strip("_") or node.op


def _target(node: fx.Node) -> str:
    """The op as text: ATen overloads as ``aten.linear.default``; the kind for anything but call_function."""
    t = node.target
    if node.op == "call_function":
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(t)
        if isinstance(t, torch._ops.HigherOrderOperator):
            return f"higher_order.{t.name()}"
        if getattr(t, "__module__", None) in ("_operator", "operator"):
            return f"operator.{t.__name__}"
        module = getattr(t, "__module__", None) or ""
        qual = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or type(t).__name__
        return _ADDRESS.sub("", f"{module}.{qual}" if module else qual)
    return f"{node.op}[{t}]"


def _module_path(node: fx.Node) -> str:
    """The innermost module the node came from, as a dotted path (``model.model.layers.0.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, value = list(stack.items())[-1]
    if _NO_MODULE.match(str(key)):
        return ""
    path = value[0] if isinstance(value, tuple) else str(value)
    return _dotted(path)


def _dotted(path: str) -> str:
    # Export spells module paths "L['self'].model.layers[3]" or "model.layers.3" depending on the version.
    path = path.replace("L['self'].", "").replace("L['self']", "").replace("L__self__.", "")
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


_SYMBOLS: dict[str, Any] = {}


def _sympy_symbol(name: str):
    if name not in _SYMBOLS:
        import sympy

        _SYMBOLS[name] = sympy.Symbol(name, integer=True, positive=True)
    return _SYMBOLS[name]
