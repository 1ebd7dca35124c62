"""Graph goldens: the normalized text of every captured graph and of every pass's output, per architecture.

``tests/goldens/capture/<arch>.txt`` is the captured graph; ``tests/goldens/<pass>/<program>-<arch>.txt`` is
the graph after ``run_passes`` of the program's pipeline up to and including that pass;
``tests/goldens/signature/<program>-<arch>.txt`` is the calling convention of the program that is lowered
(inputs and output, dtypes and symbolic shapes): what the runtime and engine files rely on. A drift fails with
a diff; regenerate with ``python -m pytest tests/test_goldens.py --update-goldens`` and review the diff.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ARCHS, build_tiny

import specpass
from specpass.graph_text import normalize, signature
from specpass.passes import PIPELINES, DraftConfig, run_passes

#: the tiny-model tests that check a torch version (`python -m pytest -m compat` runs them on the installed torch)
pytestmark = pytest.mark.compat

#: (program, number of its passes applied), one per pass of every pipeline
PASS_STAGES = [(program, i + 1) for program, passes in PIPELINES.items() for i in range(len(passes))]


def golden_draft_config(vocab: int) -> DraftConfig:
    """One draft using every draft pass on a 2-layer model: exit after layer 0, skip its MLP, keep 16 tokens;
    DEL's verify program returns exit 0's tokens over the same 16."""
    return DraftConfig(exit_layer=0, skip_mlp=(0,), vocab_ids=torch.arange(0, vocab, vocab // 16), exits=(0,))


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_golden(tiny, golden, arch):
    golden(f"capture/{arch}", normalize(tiny(arch).cg.gm))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("program", "n_passes"), PASS_STAGES, ids=[f"{p}-{PIPELINES[p][n - 1].__name__}" for p, n in PASS_STAGES]
)
def test_pass_golden(tiny, golden, arch, program, n_passes):
    cg = tiny(arch).cg
    passes = PIPELINES[program][:n_passes]
    gm = run_passes(cg.gm, passes, cg.structure, golden_draft_config(tiny(arch).vocab))
    golden(f"{passes[-1].__name__}/{program}-{arch}", normalize(gm))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("program", sorted(PIPELINES))
def test_program_signature_golden(tiny, golden, arch, program):
    cg = tiny(arch).cg
    gm = run_passes(cg.gm, PIPELINES[program], cg.structure, golden_draft_config(tiny(arch).vocab))
    golden(f"signature/{program}-{arch}", signature(gm))


def test_normalized_text_is_stable_across_captures(tiny):
    # A second capture numbers its symbols and nodes differently inside torch; the text must not change.
    again = specpass.capture(build_tiny("llama"), max_cache_len=tiny("llama").cg.spec.max_cache_len)
    assert normalize(again.gm) == normalize(tiny("llama").cg.gm)


def test_normalized_text_has_nothing_machine_specific(tiny):
    text = normalize(tiny("gpt2").cg.gm)
    assert " at 0x" not in text
    assert ".py" not in text and "/" not in text  # no stack traces or file paths
    assert not re.search(r"\bs\d{2,}\b", text), "raw export symbols (s15, ...) leaked"
    lines = text.splitlines()
    assert len(lines) == len(tiny("gpt2").cg.gm.graph.nodes)
    assert lines[-1].startswith("return ")
