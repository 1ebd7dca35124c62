"""TorchInductor lowering, ahead of time: one AOTInductor-compiled model per program.

Why ahead of time: ``torch.compile`` puts Dynamo's guard checks and a Python wrapper around every call of
the compiled graph. For a 135M-parameter model on 2 CPU cores that per-call overhead was about 4 ms of a
28 ms decode step; AOTInductor runs the same Inductor kernels from its C++ wrapper (24 ms per step in
the same measurement, SmolLM2-135M, 150-token context). The programs' KV inputs stay runtime-owned: AOTInductor writes
them in place, as the exported graph does.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch

from specpass.errors import SpecPassError

log = logging.getLogger("specpass.lower")


class AOTIProgram:
    """A loaded AOTInductor program, with what an engine file needs to load it again (package bytes, constants)."""

    def __init__(self, runner, package: bytes, constants: dict[str, torch.Tensor]):
        self.runner = runner
        self.package = package
        self.constants = constants  # fqn -> the tensor bound to it (user-managed: the model's own storage)

    def __call__(self, *args):
        return self.runner(*args)


def load_aoti_program(package: bytes, constants: dict[str, torch.Tensor], name: str) -> AOTIProgram:
    """Load a compiled package and bind its constants without copying them."""
    with tempfile.TemporaryDirectory(prefix="specpass-") as tmp:
        path = os.path.join(tmp, f"{name}.pt2")
        with open(path, "wb") as f:
            f.write(package)
        # The package is loaded into memory right away, so the file can go with the directory.
        runner = torch._inductor.aoti_load_package(path)
    needed = runner.get_constant_fqns()
    missing = [fqn for fqn in needed if fqn not in constants]
    if missing:
        raise SpecPassError(f"program '{name}': compiled model needs constants that were not given: {missing[:5]}")
    bound = {fqn: constants[fqn] for fqn in needed}
    runner.load_constants(bound, check_full_update=True, user_managed=True)
    return AOTIProgram(runner, package, bound)


def lower_inductor(gm: torch.fx.GraphModule, example_args: tuple, dynamic_shapes: tuple, name: str) -> AOTIProgram:
    """Re-export the rewritten program and compile it with AOTInductor; returns the loaded program."""
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(gm, example_args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - a rewritten graph that cannot be exported again is our bug
        raise SpecPassError(f"program '{name}' could not be re-exported for Inductor: {type(e).__name__}: {e}") from e
    with tempfile.TemporaryDirectory(prefix="specpass-") as tmp:
        # Weights stay out of the compiled library: every program binds the model's own parameters
        # (user_managed: no copy), so N programs cost one set of weights, not N + 1, in memory and on disk.
        path = torch._inductor.aoti_compile_and_package(
            exported,
            package_path=os.path.join(tmp, f"{name}.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )
        with open(path, "rb") as f:
            package = f.read()
    program = load_aoti_program(package, {**exported.state_dict, **exported.constants}, name)
    log.info("compiled program %s with AOTInductor in %.1fs", name, time.perf_counter() - t0)
    return program
