"""TorchInductor lowering, ahead of time: one AOTInductor-compiled model per program.

Why ahead of time: ``torch.compile`` puts Dynamo's guard checks and a Python wrapper around every call of
the compiled graph. For a 135M-parameter model on 2 CPU cores that per-call overhead was about 4 ms of a
28 ms decode step; AOTInductor runs the same Inductor kernels from its C++ wrapper (24 ms per step in
the same measurement, SmolLM2-135M, 150-token context). The programs' KV inputs stay runtime-owned: AOTInductor writes
them in place, as the exported graph does.

On CUDA the runner is loaded single-threaded, so that runtime/cuda_graphs.py can capture its calls in CUDA
graphs, and the kernels' cubins are embedded in the shared library: a package whose kernels are separate
files needs them on disk for as long as the runner lives.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

from specpass.errors import SpecPassError
from specpass.lower import cpu_target, program_cache
from specpass.program_export import export_program, quiet_compile

log = logging.getLogger("specpass.lower")

_HALF = (torch.float16, torch.bfloat16)


class AOTIProgram:
    """A loaded AOTInductor program, with what an engine file needs to load it again (package bytes, constants)."""

    def __init__(self, runner, package: bytes, constants: dict[str, torch.Tensor]):
        self.runner = runner
        self.package = package
        self.constants = constants  # fqn -> the tensor bound to it (user-managed: the model's own storage)

    def __call__(self, *args):
        return self.runner(*args)


def load_aoti_program(
    package: bytes, constants: dict[str, torch.Tensor], name: str, device: torch.device | str = "cpu"
) -> AOTIProgram:
    """Load a compiled package for ``device`` and bind its constants, without copying those already there."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with tempfile.TemporaryDirectory(prefix="specpass-") as tmp:
        path = os.path.join(tmp, f"{name}.pt2")
        with open(path, "wb") as f:
            f.write(package)
        if cuda:
            check_loader(path, device)
        # The package is loaded into memory right away (kernels included, see the module docstring), so the
        # file can go with the directory.
        with cpu_target.quiet_isa_mismatch():
            runner = torch._inductor.aoti_load_package(
                path, run_single_threaded=cuda, device_index=device.index if cuda else -1
            )
    needed = runner.get_constant_fqns()
    missing = [fqn for fqn in needed if fqn not in constants]
    if missing:
        raise SpecPassError(f"program '{name}': compiled model needs constants that were not given: {missing[:5]}")
    bound = {fqn: bind_on_device(constants[fqn], device, f"program '{name}': constant {fqn}") for fqn in needed}
    runner.load_constants(bound, check_full_update=True, user_managed=True)
    return AOTIProgram(runner, package, bound)


#: What check_loader's child process runs: load the package as load_aoti_program does.
_PROBE = (
    "import sys, torch; "
    "torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True, device_index=int(sys.argv[2]))"
)
_probed: dict[str, str | None] = {}  # device -> None (the loader works) or why it does not


def check_loader(path: str, device: torch.device) -> None:
    """Load the package in a child process first, once per device and process: on some CUDA machines
    AOTInductor's loader kills the process (SIGSEGV in AOTIModelPackageLoader with torch 2.11.0+cu130 on an
    H200, 2026-11-27, for every package, a one-layer model with torch's default settings included), and a user's
    process must get an error it can act on, not die."""
    key = str(device)
    if key not in _probed:
        try:
            done = subprocess.run(
                [sys.executable, "-c", _PROBE, path, str(device.index if device.index is not None else -1)],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            _probed[key] = "its loader did not return within 600 s"
        else:
            if done.returncode < 0:
                name = signal.Signals(-done.returncode).name
                _probed[key] = f"its loader crashed the process ({name})"
            elif done.returncode:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                _probed[key] = f"its loader failed: {last[:300]}"
            else:
                _probed[key] = None
    if _probed[key] is not None:
        raise SpecPassError(
            f"AOTInductor cannot load programs on {device} here: {_probed[key]} (in a child process, torch "
            f"{torch.__version__}). Compile with backend='eager' (`--backend eager`), which still replays CUDA "
            "graphs, or use another torch build."
        )


def bind_on_device(t: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """``t`` if it lies on ``device``, else a copy there: a user-managed constant is read in place by the
    compiled kernels, and a CUDA kernel given a host pointer crashes the process instead of raising."""
    if t.device == device:
        return t
    log.debug("%s is on %s, not %s: bound as a copy", what, t.device, device)
    return t.to(device)


def inductor_configs(
    device: torch.device, dtype: torch.dtype, *, few_tokens: bool = False, isa: str | None = None
) -> dict:
    """AOTInductor settings for a program on ``device`` whose activations are ``dtype``; ``few_tokens``: a decode,
    verify or draft program (a handful of tokens a call), not the prefill; ``isa``: the x86-64 level a CPU program
    is compiled for (lower/cpu_target.py; default: this CPU's best)."""
    configs = {
        # Weights stay out of the compiled library: every program binds the model's own parameters
        # (user_managed: no copy), so N programs cost one set of weights, not N + 1, in memory and on disk.
        "aot_inductor.package_constants_in_so": False,
    }
    if dtype in _HALF:
        # Round every op's result to bf16/fp16 as eager PyTorch does; fused in fp32 the logits drift from HF
        # generate's by an ulp, which flips the frequent near-ties of half precision.
        configs["emulate_precision_casts"] = True
    if device.type == "cuda":
        configs["aot_inductor.embed_kernel_binary"] = True
    if device.type == "cpu":
        configs.update(cpu_target.configs(isa or cpu_target.default_level()))
    if few_tokens and device.type == "cpu":
        # Inductor's own kernels here (norms, rotary, activations) see a few rows of a few hundred values: one
        # thread does them sooner than an OpenMP region's fork and join (5% of the default model's decode step on
        # a 2-core Xeon: docs/benchmarks.md). The low-bit and attention operators keep torch's threads.
        configs["cpp.threads"] = 1
    return configs


def lower_inductor(
    gm: torch.fx.GraphModule,
    example_args: tuple,
    dynamic_shapes: tuple,
    name: str,
    pipeline: tuple = (),
    *,
    few_tokens: bool = False,
    background: bool = False,
    isa: str | None = None,
):
    """Re-export the rewritten program and compile it with AOTInductor, or load it from the program cache
    (lower/program_cache.py); returns the loaded program.

    ``background``: compile in a child process and return a PendingProgram at once (``result()`` waits for it),
    so that the caller compiles another program meanwhile: Inductor's compile is mostly single-threaded Python,
    and on a 2-core CPU two programs compile in about the time of one.
    """
    t0 = time.perf_counter()
    # The KV cache (the last input) sets device and dtype: ids, positions and slots are integers.
    device, dtype = example_args[-1].device, example_args[-1].dtype
    configs = inductor_configs(device, dtype, few_tokens=few_tokens, isa=isa)
    key, constants = None, None
    if program_cache.enabled():
        constants = program_cache.constants_of(gm)
        key = program_cache.program_key(gm, example_args, dynamic_shapes, configs, pipeline, constants)
        package = program_cache.load(key)
        if package is not None:
            try:
                program = load_aoti_program(package, constants, name, device)
            except Exception as e:  # noqa: BLE001 - any entry that does not load is compiled again
                program_cache.discard(key, f"did not load ({type(e).__name__}: {str(e)[:200]})")
            else:
                log.info("loaded program %s from the program cache in %.1fs", name, time.perf_counter() - t0)
                return program
    try:
        exported = export_program(gm, example_args, dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - a rewritten graph that cannot be exported again is our bug
        raise SpecPassError(f"program '{name}' could not be re-exported for Inductor: {type(e).__name__}: {e}") from e
    pending = PendingProgram(exported, configs, name, device, key, constants, t0)
    if background and device.type == "cpu" and os.cpu_count() and os.cpu_count() > 1:
        pending.start()
        return pending
    return pending.result()


class PendingProgram:
    """An exported program being compiled, in a child process (``start``) or here (``result`` without one)."""

    def __init__(self, exported, configs: dict, name: str, device, key: str | None, constants, t0: float):
        self.exported, self.configs, self.name, self.device = exported, configs, name, device
        self.key, self.constants, self.t0 = key, constants, t0
        self.child: subprocess.Popen | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        """Save the exported program and start a child process compiling it (lower/aoti_worker.py)."""
        self.tmp = tempfile.TemporaryDirectory(prefix="specpass-")
        src, configs = os.path.join(self.tmp.name, "in.pt2"), os.path.join(self.tmp.name, "configs.json")
        with quiet_compile():
            torch.export.save(self.exported, src)
        with open(configs, "w") as f:
            json.dump(self.configs, f)
        out = os.path.join(self.tmp.name, f"{self.name}.pt2")
        self.child = subprocess.Popen(
            self.command(src, out, configs),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = out

    @staticmethod
    def command(src: str, out: str, configs: str) -> list[str]:
        """The child process: lower/aoti_worker.py."""
        return [sys.executable, "-m", "specpass.lower.aoti_worker", src, out, configs]

    def cancel(self) -> None:
        """Stop the child process (if it still runs) and remove its files."""
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        if self.tmp is not None:
            self.tmp.cleanup()

    def result(self) -> AOTIProgram:
        """The loaded program: the child's package, or (no child, or a child that failed) compiled here."""
        package = None
        if self.child is not None:
            try:
                _, err = self.child.communicate()
                if self.child.returncode == 0:
                    with open(self.out, "rb") as f:
                        package = f.read()
                else:
                    last = (err.strip().splitlines() or ["no message"])[-1][:300]
                    log.warning(
                        "compiling program %s in a child process failed (%s); compiling it here", self.name, last
                    )
            finally:
                self.tmp.cleanup()
        if package is None:
            with tempfile.TemporaryDirectory(prefix="specpass-") as tmp, quiet_compile():
                path = cpu_target.compile_package(self.exported, os.path.join(tmp, f"{self.name}.pt2"), self.configs)
                with open(path, "rb") as f:
                    package = f.read()
        exported = self.exported
        program = load_aoti_program(package, {**exported.state_dict, **exported.constants}, self.name, self.device)
        log.info("compiled program %s with AOTInductor in %.1fs", self.name, time.perf_counter() - self.t0)
        if self.key is not None:
            # An entry is only worth keeping if a later process can bind it from the graph's own tensors.
            unbound = set(program.runner.get_constant_fqns()) - set(self.constants)
            if unbound:
                log.debug(
                    "program %s not cached: constants %s are not attributes of its graph",
                    self.name,
                    sorted(unbound)[:5],
                )
            else:
                program_cache.store(self.key, package, self.name)
        return program
