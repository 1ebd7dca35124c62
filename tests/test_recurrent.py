"""Per-layer cache kinds: latent attention and mixed K/V shapes, linear-attention hybrids and state-space models.

Recurrent state (conv + SSM / linear-attention state) is owned by the runtime like the KV cache; a speculative
round checkpoints it and a rejected draft must leave nothing in it. The oracles: HF ``generate`` for greedy
decoding (plain and forced speculation, whose drafts get rejected), the model's own forward after random
accept/reject rounds, and chi-square tests of sampling with negative controls that must fail.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import chi2_pvalue, negative_control_pvalue, sampled_counts
from test_speculative import _hf, _second_token_sampler

import specpass
from specpass.cache_spec import CONV, KEY, RECURRENT, VALUE
from specpass.errors import SpecPassError
from specpass.programs import build_draft_programs, check_tree_verify
from specpass.runtime.generate import _run
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.pieces import piece_lengths
from specpass.runtime.sampling import SamplingConfig, warp
from specpass.tiny_models import build_tiny_model
from specpass.tune.plan import SpecPlan

#: context lookup, else an early exit after layer 0 that drafts 3 tokens whatever its confidence (coverage's plan)
FORCED = SpecPlan(speculate=True, lookup=2, exit_layer=0, max_draft=3, threshold=0.0, adaptive=False)


def _rejecting_plan(model, want: torch.Tensor) -> SpecPlan:
    """The early exit alone, with a draft vocabulary that lacks every other token of ``want``'s continuation:
    verification both accepts and rejects its drafts (a random model's exit after layer 0 agrees too well)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    missing = set(want[0].tolist()[::2])
    vocab_ids = [t for t in range(vocab) if t not in missing]
    return SpecPlan(speculate=True, exit_layer=0, vocab_ids=vocab_ids, max_draft=3, threshold=0.0, adaptive=False)


@pytest.fixture(scope="module")
def tiny():
    made = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = build_tiny_model(model_type)
        return made[model_type]

    return get


@pytest.fixture(scope="module")
def compiled(tiny):
    """``compiled(model_type) -> (model, SpecModel)``: compiled once per architecture with the FORCED plan
    (max_cache_len=48); tests that need another plan switch it with ``_use_plan``."""
    made = {}

    def get(model_type: str):
        if model_type not in made:
            model = tiny(model_type)
            sm = specpass.optimize(
                model, speculate=True, plan=FORCED, backend="eager", max_cache_len=48, progress=False
            )
            made[model_type] = model, sm
        return made[model_type]

    return get


def _use_plan(sm, plan: SpecPlan) -> None:
    """Speculate with ``plan`` on the programs already compiled (its draft program built as optimize() would)."""
    build_draft_programs(sm, plan)
    sm.plan = plan


def _layout(spec) -> list[set[str]]:
    per_layer = [set() for _ in range(spec.num_layers)]
    for t in spec.tensors:
        per_layer[t.layer].add(t.kind)
    return per_layer


def test_piece_lengths():
    assert piece_lengths(7, 64) == [4, 2, 1]
    assert piece_lengths(1, 64) == [1]
    assert piece_lengths(130, 64) == [64, 64, 2]
    assert piece_lengths(3, 1) == [1, 1, 1]


def test_cache_layouts_per_layer_kind(tiny, compiled):
    hybrid = compiled("qwen3_next")[1].captured
    assert _layout(hybrid.spec) == [{CONV, RECURRENT}, {KEY, VALUE}]  # linear attention, then full attention
    assert hybrid.spec.has_state and hybrid.query_len == 1 and hybrid.max_query_len > 1
    assert _layout(compiled("falcon_h1")[1].captured.spec) == [{KEY, VALUE, CONV, RECURRENT}] * 2  # both in a layer
    ssm = compiled("mamba")[1].captured
    assert _layout(ssm.spec) == [{CONV, RECURRENT}] * 2
    # Mamba's reference scan drops the previous state when it reads several tokens, which capture measures.
    assert ssm.max_query_len == 1
    mla = specpass.capture(tiny("deepseek_v3"), max_cache_len=16)
    k, v = (t for t in mla.spec.tensors if t.layer == 0)
    assert k.shape[-1] != v.shape[-1]  # multi-head latent attention: K and V head dims differ
    gemma4 = specpass.capture(tiny("gemma4_text"), max_cache_len=16)
    assert len({t.shape for t in gemma4.spec.tensors}) == 2 and gemma4.query_len is None


@pytest.mark.parametrize("model_type", ["qwen3_next", "mamba", "falcon_h1"])
def test_greedy_plain_and_speculative_equal_hf(compiled, model_type):
    model, sm = compiled(model_type)
    ids = torch.tensor([[5, 17, 9, 5, 17, 30, 2, 8]])
    want = _hf(model, ids, 24)
    for plan in (FORCED, _rejecting_plan(model, want[:, ids.shape[1] :])):
        _use_plan(sm, plan)
        assert torch.equal(sm.generate(ids, max_new_tokens=24, eos_token_id=[], speculate=False), want)
        assert torch.equal(sm.generate(ids, max_new_tokens=24, eos_token_id=[]), want)
    stats = sm.last_stats
    assert sum(stats.accepted) < sum(stats.drafted), "no draft was rejected: the rollback went untested"


def test_without_state_rollback_speculation_differs(compiled, monkeypatch):
    """Negative control: a rejected draft left in the recurrent state changes the output."""
    model, sm = compiled("qwen3_next")
    ids = torch.tensor([[5, 17, 9, 5, 17, 30, 2, 8]])
    want = _hf(model, ids, 24)
    _use_plan(sm, _rejecting_plan(model, want[:, ids.shape[1] :]))
    monkeypatch.setattr(KVCache, "restore", lambda self: None)
    assert not torch.equal(sm.generate(ids, max_new_tokens=24, eos_token_id=[]), want)


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1"])
def test_random_accept_reject_rounds_match_recomputation(compiled, model_type):
    """Rounds of k verified tokens of which a random prefix is kept (checkpoint, run, restore, run the kept
    ones): the next logits equal the model's forward over the kept sequence."""
    model, sm = compiled(model_type)
    decode, cache = sm.programs["decode"], sm.cache
    rng = random.Random(model_type)
    with torch.no_grad():
        for _ in range(3):
            kept = [rng.randrange(3, 200) for _ in range(rng.randint(1, 5))]
            cache.reset()
            _run(sm.programs["prefill"], cache, torch.tensor([kept]))
            cache.commit(len(kept))
            for _ in range(4):
                proposed = [rng.randrange(3, 200) for _ in range(rng.randint(1, 4))]
                cache.checkpoint()
                _run(decode, cache, torch.tensor([proposed]))
                n = rng.randint(0, len(proposed))
                cache.restore()
                if n:
                    _run(decode, cache, torch.tensor([proposed[:n]]))
                    cache.commit(n)
                kept += proposed[:n]
            probe = rng.randrange(3, 200)
            got = _run(decode, cache, torch.tensor([[probe]]))[0, -1]
            want = model(torch.tensor([[*kept, probe]]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_lm_refuses_cuda_graphs_and_trees_for_recurrent_state(compiled):
    # What optimize() checks, enforced by the object itself: set directly, neither may take effect.
    model, sm = compiled("mamba")
    with pytest.raises(SpecPassError, match="cuda_graphs=True is refused for a model with recurrent state"):
        sm.cuda_graphs = True
    assert sm.cuda_graphs is False
    plan = sm.plan
    with pytest.raises(SpecPassError, match="draft trees are not supported for models with recurrent state"):
        sm.plan = SpecPlan(speculate=True, lookup=2, tree_budget=4)
    assert sm.plan is plan
    ids = torch.tensor([[5, 17, 9, 5, 17, 30]])
    assert torch.equal(sm.generate(ids, max_new_tokens=12, eos_token_id=[]), _hf(model, ids, 12))


def test_trees_and_engines_are_refused_with_a_reason(compiled, tmp_path):
    from specpass.engine import write_engine

    _, sm = compiled("qwen3_next")
    with pytest.raises(SpecPassError, match="draft trees are not supported for models with recurrent state"):
        check_tree_verify(sm)  # what optimize() and calibration ask before trees
    with pytest.raises(SpecPassError, match="recurrent state"):
        write_engine(sm, tmp_path / "x.specpass")
    assert not list(tmp_path.iterdir())


# ---- sampling ------------------------------------------------------------------------------------------
N_SAMPLES = 500


def _second_token_distribution(model, ids, cfg: SamplingConfig) -> torch.Tensor:
    """Exact law of the second sampled token: sum over first tokens t of p(t) p(. | t)."""
    with torch.no_grad():
        first = warp(model(ids, use_cache=False).logits[:, -1], cfg).softmax(-1)[0]
        vocab = first.shape[0]
        both = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        second = warp(model(both, use_cache=False).logits[:, -1], cfg).softmax(-1)
    return first @ second


@pytest.fixture(scope="module", params=["qwen3_next", "mamba2"])
def sampling_setup(request):
    """An 8-token linear-attention hybrid (Qwen3-Next) or state-space model (Mamba2) whose second token is
    drafted by an early exit after layer 0 and verified (rejected or not) against the target."""
    model = build_tiny_model(request.param, vocab_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.no_grad():  # spread the next-token distributions out, and let the recurrent layer weigh in
        model.get_output_embeddings().weight.normal_(0, 1.0)
        for name, module in model.named_modules():
            if name.endswith(("layers.0.linear_attn.out_proj", "layers.0.mixer.out_proj")):
                module.weight.mul_(10)
    plan = SpecPlan(speculate=True, exit_layer=0, max_draft=1, threshold=0.0, adaptive=False)
    sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=16)
    return model, sm, torch.tensor([[1, 3, 5]]), SamplingConfig(True, temperature=0.9, top_k=6, top_p=0.95)


def test_speculative_sampling_matches_the_target_distribution(sampling_setup):
    model, sm, ids, cfg = sampling_setup
    counts = sampled_counts(
        _second_token_sampler(sm, ids, cfg), N_SAMPLES, sm.model.get_output_embeddings().weight.shape[0]
    )
    assert sm.last_stats.drafted == [1]  # the second token went through draft + verify
    assert chi2_pvalue(counts, _second_token_distribution(model, ids, cfg)) > 1e-3


def test_speculative_sampling_without_state_rollback_fails(sampling_setup, monkeypatch):
    """Negative control: a rejected draft left in the recurrent state changes the distribution (the acceptance
    rule's own negative controls are in test_speculative.py)."""
    model, sm, ids, cfg = sampling_setup
    monkeypatch.setattr(KVCache, "restore", lambda self: None)
    probs = _second_token_distribution(model, ids, cfg)
    # Broken: a token of probability 0 was sampled, or the counts do not fit.
    assert negative_control_pvalue(_second_token_sampler(sm, ids, cfg), N_SAMPLES, probs) < 1e-3


def test_calibration_of_a_hybrid_where_only_some_layers_hold_kv(tiny):
    """Calibration (exits, skip sets, lookup, DEL; trees refused with the reason) on a model whose first layer
    keeps recurrent state and no K/V; its plan then generates what HF does."""
    from specpass.tune.calibrate import CalibrationSettings

    model = tiny("qwen3_next")
    quick = CalibrationSettings(new_tokens=12, train_seconds=1.0, timed_prompts=2, timed_tokens=8, finalists=1)
    prompts = [list(range(3, 15)), list(range(40, 49)), list(range(90, 101))]
    plan = specpass.calibrate(model, prompts, backend="eager", max_cache_len=48, settings=quick, progress=False)
    assert "draft trees are not supported" in plan.measurements.get("trees_refused", "")
    sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=48, progress=False)
    ids = torch.tensor([[5, 17, 9, 5, 17, 30, 2, 8]])
    assert torch.equal(sm.generate(ids, max_new_tokens=16, eos_token_id=[]), _hf(model, ids, 16))
