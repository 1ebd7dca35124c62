"""DEL, the dynamic exit layer: the choice of exit and draft length from online acceptance estimates, and
decoding with it on a 4-layer model (greedy equality with HF; the exit that matches the target wins)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import specpass
from specpass.errors import SpecPassError
from specpass.runtime.dynamic_exit import VERIFY_EXITS, ExitChooser, draft_program_name
from specpass.tune.calibrate import CalibrationSettings
from specpass.tune.plan import SpecPlan


def test_chooser_maximises_expected_tokens_per_cost():
    chooser = ExitChooser([1, 5], costs=[0.1, 0.3], max_draft=4, prior=0.5)
    # alpha .5 everywhere: the cheaper exit; 1 + .5 + .25 tokens for 1.2 beats 1.5 / 1.1 and 1.875 / 1.3.
    assert chooser.choose() == (1, 2)
    chooser.alpha = {1: 0.2, 5: 0.95}
    k, gamma = chooser.choose()
    assert k == 5 and gamma == 4  # a reliable exit drafts as far as allowed
    chooser.alpha = {1: 0.05, 5: 0.1}
    assert chooser.choose()[1] == 0  # no draft pays: a plain step


def test_chooser_learns_from_verified_tokens():
    chooser = ExitChooser([0, 2], costs=[0.2, 0.4], max_draft=3)
    verified = [7, 8, 9, 10]
    for _ in range(10):
        chooser.update({0: [1, 1, 1, 1], 2: verified}, verified)  # exit 2 agrees everywhere, exit 0 nowhere
    assert chooser.alpha[0] < 0.01 and chooser.alpha[2] > 0.99
    assert chooser.choose() == (2, 3)
    with pytest.raises(ValueError, match="one cost per exit"):
        ExitChooser([0, 2], costs=[0.2], max_draft=3)


def _four_layers(identity_last: bool):
    """A sharpened 4-layer Llama; with ``identity_last`` its last layer adds nothing, so exit 2 is exact."""
    model = tiny_llama(num_hidden_layers=4, max_position_embeddings=128).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
        if identity_last:
            model.model.layers[3].self_attn.o_proj.weight.zero_()
            model.model.layers[3].mlp.down_proj.weight.zero_()
    return model


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("identity_last", [False, True])
def test_del_greedy_equals_hf_and_finds_the_exact_exit(identity_last):
    model = _four_layers(identity_last)
    # Costs from parameter counts, or given: exit 2 then costs little more than exit 0, so exactness must win
    # (by parameter counts exit 0 costs 0.29 of a verify pass, exit 2 0.76, and exit 0 accepts 2 tokens in 3
    # here: it would rightly win).
    costs = [0.3, 0.35, 0.4] if identity_last else []
    plan = SpecPlan(speculate=True, del_exits=[0, 1, 2], del_costs=costs, max_draft=4, threshold=0.0, adaptive=False)
    sm = specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=128, progress=False)
    assert sorted(sm.programs) == sorted(["prefill", "decode", VERIFY_EXITS, *map(draft_program_name, (0, 1, 2))])
    costs = sm.plan.del_costs
    assert len(costs) == 3 and costs == sorted(costs) and 0 < costs[0] and costs[-1] < 1
    for seed, (plen, n) in enumerate([(5, 60), (11, 23)]):
        ids = torch.randint(0, 64, (1, plen), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sm.generate(ids, max_new_tokens=n), _hf(model, ids, n)), f"prompt {seed}"
    if identity_last:  # exit 2 computes the target itself: DEL learns that and drafts there, and all is accepted
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        sm.generate(ids, max_new_tokens=60)
        stats = sm.last_stats
        assert max(stats.exit_rounds, key=stats.exit_rounds.get) == 2
        assert stats.tau > 3.0


def test_del_plans_are_checked():
    model = _four_layers(False)
    for plan, message in [
        (SpecPlan(speculate=True, del_exits=[0, 3]), r"del_exits must be distinct layers in \[0, 2\]"),
        (SpecPlan(speculate=True, del_exits=[1, 1]), "distinct"),
        (SpecPlan(speculate=True, del_exits=[1], exit_layer=2), "DEL plan"),
        (SpecPlan(speculate=True, del_exits=[1], tree_budget=4), "DEL plan"),
        (SpecPlan(speculate=True, del_exits=[0, 1], del_costs=[0.5]), "del_costs has 1 entries for 2"),
    ]:
        with pytest.raises(SpecPassError, match=message):
            specpass.optimize(model, speculate=True, plan=plan, backend="eager", max_cache_len=32, progress=False)
    assert "DEL: exit after layer 0 / 2" in SpecPlan(speculate=True, del_exits=[0, 2]).describe()


def test_calibration_times_del_where_an_exit_pays():
    """An exact exit (the last layer adds nothing) agrees everywhere: calibration times a DEL plan over it;
    a random model's exits rarely agree, and calibration says what it estimated instead of compiling."""
    settings = CalibrationSettings(new_tokens=12, train_seconds=1.0, timed_prompts=2, timed_tokens=24, finalists=1)
    plan = specpass.calibrate(_four_layers(True), backend="eager", max_cache_len=128, settings=settings, progress=False)
    m = plan.measurements
    assert m["agreement_no_adapter"][2] == 1.0 and 2 in m["del_estimate"]["exits"]
    assert m["del_estimate"]["tokens_per_plain_pass"] > 1.05
    timed = [t for t in m["timed"] if "del_exits" in t]
    assert len(timed) == 1 and timed[0]["del_exits"] == m["del_estimate"]["exits"]
    flat = tiny_llama(num_hidden_layers=4, max_position_embeddings=128).eval().requires_grad_(False)
    plan = specpass.calibrate(flat, backend="eager", max_cache_len=128, settings=settings, progress=False)
    assert plan.measurements["del_estimate"]["tokens_per_plain_pass"] < 1.05
    assert not [t for t in plan.measurements["timed"] if "del_exits" in t]
