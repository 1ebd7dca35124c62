"""GPU tests: run wherever a CUDA GPU is visible (CI has none; they skip there with the reason).

examples/gpu_check.py runs them (with the ``compat`` tests) before its benchmarks.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_speculative import PLANS

import specpass
from specpass.bench import compare_outputs
from specpass.tiny_models import build_tiny_model
from specpass.tune.plan import SpecPlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PLAN = SpecPlan(speculate=True, lookup=2, exit_layer=0, max_draft=2, threshold=0.0, adaptive=False)


def _sharpened_cuda(dtype=torch.float32):
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # far from ties
    return model.to("cuda", dtype)


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None
        )


def _greedy_matches_hf(model, sm, prompts=((3, 1, 4, 1, 5, 9, 2, 6), tuple(range(5, 75))), n=32) -> int:
    """Every prompt's output equals HF's, or first differs at a near-tie; returns the near-ties."""
    near_ties = 0
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        out = sm.generate(ids, max_new_tokens=n, eos_token_id=[])
        assert out.device.type == "cuda"
        diff = compare_outputs(model, ids, _hf(model, ids, n), out)
        if diff is not None:
            assert diff["near_tie"], diff
            near_ties += 1
    return near_ties


def _graphed_buckets(sm) -> int:
    return sum(len(g.buckets) for name, g in sm.runnable_programs().items() if name != "prefill")


@pytest.mark.parametrize("plan", ["plain", "lookup_then_exit"])
def test_inductor_on_cuda_greedy_equals_hf(plan):
    model = _sharpened_cuda()
    sm = specpass.optimize(
        model,
        speculate=plan != "plain",
        plan=PLAN if plan != "plain" else None,
        backend="inductor",
        max_cache_len=128,
        progress=False,
    )
    for name, program in sm.programs.items():  # every bound constant lies on the GPU
        assert {t.device.type for t in program.constants.values()} == {"cuda"}, name
    assert sm.cuda_graphs
    assert _greedy_matches_hf(model, sm) == 0
    assert _graphed_buckets(sm) >= 2  # two mask widths at least (the second prompt crosses 64 slots)


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("plan", ["tree_eagle2", "del", "tree_fused"])
def test_graphs_on_cuda_greedy_equals_hf(plan, backend):
    model = _sharpened_cuda()
    sm = specpass.optimize(model, speculate=True, plan=PLANS[plan], backend=backend, max_cache_len=128, progress=False)
    assert _greedy_matches_hf(model, sm) == 0
    assert _graphed_buckets(sm) >= 2


def test_cuda_graphs_off_gives_the_same_tokens():
    model = _sharpened_cuda()
    sm = specpass.optimize(model, speculate=True, plan=PLANS["tree_fused"], backend="eager", max_cache_len=128)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]], device="cuda")
    graphed = sm.generate(ids, max_new_tokens=40, eos_token_id=[])
    sm.cuda_graphs = False
    assert torch.equal(sm.generate(ids, max_new_tokens=40, eos_token_id=[]), graphed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inductor_on_cuda(dtype):
    model = _sharpened_cuda(dtype)
    sm = specpass.optimize(model, speculate=True, plan=PLAN, backend="inductor", max_cache_len=128, progress=False)
    assert {t.dtype for t in sm.cache.tensors} == {dtype}
    near_ties = _greedy_matches_hf(model, sm)
    print(f"{dtype}: near-ties tolerated: {near_ties} of 2 prompts")


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None, reason="needs torch-tensorrt")
def test_tensorrt_greedy_equals_hf():
    model = _sharpened_cuda()
    sm = specpass.optimize(model, speculate=True, plan=PLAN, backend="tensorrt", max_cache_len=128, progress=False)
    assert _greedy_matches_hf(model, sm) == 0
