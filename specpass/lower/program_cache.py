"""Compiled AOTInductor programs kept on disk, so that a second process skips Inductor's compile.

An entry is the package's bytes (``<key>.pt2``) and a sidecar (``<key>.json``, written last) with their sha256.
The key covers everything the compiled code depends on: the rewritten graph's code, its inputs' shapes and
dtypes and their dynamic ranges (the cache size among them), the pass pipeline that made it, every constant's
name, shape, stride and dtype, the values of constants that are not model parameters (rotary tables, pruned
head rows: Inductor may fold them), the Inductor settings, device and dtype, and the versions of specpass,
torch and Python, and the CPU's vector ISA or the GPU. The weights themselves are not in it: a package binds
the model's parameters when it is loaded (``package_constants_in_so=False``), so one entry serves every
checkpoint of an architecture.

``SPECPASS_PROGRAM_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import torch
from torch import nn

from specpass import machine
from specpass.cache import cache_root, check_private, write_atomic
from specpass.version import __version__

log = logging.getLogger("specpass.lower")

#: bump when what an entry holds, or how it is keyed, changes
ENTRY_VERSION = 1
ENV_SWITCH = "SPECPASS_PROGRAM_CACHE"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def program_dir():
    return cache_root() / "programs"


def constants_of(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads by name: parameters and buffers (non-persistent ones and tied ones under
    each of their names included), and tensor attributes of ``get_attr`` nodes; the names AOTInductor asks for
    when its constants are bound."""
    out = dict(gm.named_parameters(remove_duplicate=False))
    out.update(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                out[node.target] = value
    return out


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        return f"cuda|{torch.cuda.get_device_name(index)}|sm{cap[0]}{cap[1]}|cuda {torch.version.cuda}"
    # Inductor compiles for the ISA it detects: a program from another CPU of a cache shared between machines
    # could be an illegal instruction here (a dead process, no error to catch)
    return f"{device.type}|{machine.cpu_key()}|{torch.backends.cpu.get_cpu_capability()}"


def _describe(value) -> str:
    """A stable text for example inputs and dynamic shapes (tensors by shape/dtype, never by value or id)."""
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{value.dtype}{value.device.type}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_describe(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, list | tuple):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return repr(value)


def program_key(
    gm: torch.fx.GraphModule,
    example_args: tuple,
    dynamic_shapes,
    configs: dict,
    pipeline: tuple,
    constants: dict[str, torch.Tensor],
) -> str:
    """The cache key of the program that ``gm`` compiles to (see the module docstring)."""
    h = hashlib.sha256()

    def put(*parts) -> None:
        for part in parts:
            h.update(str(part).encode())
            h.update(b"\0")

    device = example_args[-1].device
    put(ENTRY_VERSION, __version__, torch.__version__, sys.version_info[:2], _device_tag(device))
    put(_describe(sorted(configs.items())), _describe(example_args), _describe(dynamic_shapes))
    put(*(getattr(p, "__name__", repr(p)) for p in pipeline))
    put(gm.code)
    for name, t in sorted(constants.items()):
        put(name, tuple(t.shape), t.stride(), t.dtype, t.device.type)
        if not isinstance(t, nn.Parameter):
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:40]


def load(key: str) -> bytes | None:
    """The package stored under ``key``, or None; a damaged entry is removed with a warning."""
    folder = program_dir()
    package_path, meta_path = folder / f"{key}.pt2", folder / f"{key}.json"
    if not meta_path.is_file():
        return None  # never stored, or a writer died before its sidecar: the package alone is not trusted
    check_private(package_path)  # the sha256 beside it proves it intact, not who wrote it
    try:
        meta = json.loads(meta_path.read_text())
        package = package_path.read_bytes()
        ok = hashlib.sha256(package).hexdigest() == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        discard(key, "its file is damaged or incomplete")
        return None
    return package


def discard(key: str, why: str) -> None:
    """Remove a cache entry that cannot be used, saying why; it is compiled again."""
    log.warning("specpass program cache: entry %s %s; compiling the program again", key, why)
    for suffix in (".json", ".pt2"):
        try:
            (program_dir() / f"{key}{suffix}").unlink(missing_ok=True)
        except OSError:
            pass


def store(key: str, package: bytes, name: str) -> None:
    """Keep ``package`` under ``key``; a cache that cannot be written costs the next process a compile, no more."""
    folder = program_dir()
    meta = {
        "sha256": hashlib.sha256(package).hexdigest(),
        "bytes": len(package),
        "program": name,
        "specpass": __version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        write_atomic(folder / f"{key}.pt2", package)
        write_atomic(folder / f"{key}.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        log.warning("specpass program cache: cannot write %s (%s); programs will be compiled again", folder, e)
