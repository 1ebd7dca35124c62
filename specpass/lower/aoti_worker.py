"""Compile one saved ExportedProgram with AOTInductor, in a process of its own (lower/inductor.py's background
compile): ``python -m specpass.lower.aoti_worker IN.pt2 OUT.pt2 CONFIGS.json``."""

from __future__ import annotations

import json
import sys

import torch

import specpass.kernels  # noqa: F401 - the custom operators' schemas, which the saved graph calls
from specpass.lower.cpu_target import compile_package
from specpass.program_export import quiet_compile


def main(argv: list[str]) -> int:
    src, out, configs = argv
    with open(configs) as f:
        inductor_configs = json.load(f)
    with quiet_compile():
        exported = torch.export.load(src)
        compile_package(exported, out, inductor_configs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
