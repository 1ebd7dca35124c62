"""GPU tests: run wherever a CUDA GPU is visible (CI has none; they skip there with the reason)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import specpass
from specpass.coverage import build_tiny_model
from specpass.tune.plan import SpecPlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PLAN = SpecPlan(speculate=True, lookup=2, exit_layer=0, max_draft=2, threshold=0.0, adaptive=False)


def _greedy_matches_hf(backend: str) -> None:
    model = build_tiny_model("llama").to("cuda")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # far from ties
    sm = specpass.optimize(model, speculate=True, plan=PLAN, backend=backend, max_cache_len=64, progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]], device="cuda")
    out = sm.generate(ids, max_new_tokens=32, eos_token_id=[])
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, eos_token_id=None
        )
    assert torch.equal(out.cpu(), ref.cpu())


def test_inductor_on_cuda_greedy_equals_hf():
    _greedy_matches_hf("inductor")


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None, reason="needs torch-tensorrt")
def test_tensorrt_greedy_equals_hf():
    _greedy_matches_hf("tensorrt")
