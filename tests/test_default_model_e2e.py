"""End to end on the real default model: specpass (Inductor) greedy output equals HF eager generate, plain and
speculative (``speculate=True``: the calibrated draft, verified); against generate's own output on every
``PLAIN_EVERY``-th prompt, against HF's logits from one forward pass over specpass's output on the others."""

from __future__ import annotations

import json
import os

import pytest
import torch

import specpass
from specpass import bench
from specpass.bench import compare_outputs, load_questions, near_tie_threshold, resolve_prompts, stratified_sample
from specpass.programs import speculate_with
from specpass.tokenization import chat_ids
from specpass.tune.calibrate import DEFAULT_PROMPTS, CalibrationSettings, calibrate_compiled

pytestmark = pytest.mark.slow

#: greedy equality with speculation over stratified Spec-Bench dev prompts, plain decoding on every 4th of them.
#: CI checks 12; issue 3's bar was 48: SPECPASS_E2E_PROMPTS=48 runs that. docs/benchmarks.md's benches check 24.
N_PROMPTS = int(os.environ.get("SPECPASS_E2E_PROMPTS", "12"))
#: the prompts HF ``generate`` itself decodes (its reference is the output); the others are judged by one forward
#: pass over specpass's output (``hf_greedy_departures``): 128 HF eager steps take 8-15 s a prompt on 2 cores, the
#: forward under a second
PLAIN_EVERY = 4
NEW_TOKENS = 128
#: the KV cache of this file's programs, and of its bench run (the last test), so that the bench loads the compiled
#: prefill and decode from the program cache (2-3 minutes of CI)
SHARED_CACHE_LEN = 960
#: A shorter full search than `specpass tune`'s (4-6 minutes on the 2-core EPYC): fewer candidates and prompts, adapters
#: trained for seconds, timed on fewer tokens. It runs the same code on the real model (exit adapters trained, draft
#: programs compiled and timed); its plan is whichever candidate measured fastest, on some CPUs context lookup alone
#: (the 2-core Zen 4, 2026-12-06). How fast the searches' plans are, the benchmarks say (docs/benchmarks.md).
QUICK = CalibrationSettings(
    new_tokens=32,
    train_seconds=3.0,
    skip_candidates=1,
    timed_prompts=2,
    timed_tokens=32,
    finalists=1,
    lookup_tokens=(2,),
    lookup_min_ngrams=(1,),
    tree_budgets=(4,),
)
#: a third of the built-in calibration prompts (their text is generated before any candidate is timed)
CALIBRATION_PROMPTS = DEFAULT_PROMPTS[::3]


@pytest.fixture(scope="module")
def reference():
    """The default model, the prompts, HF eager's greedy outputs for every ``PLAIN_EVERY``-th of them (by prompt
    index), and the model compiled with speculation (``speculate=True``: the calibrated plan's drafts, verified)."""
    from specpass.models import default_model

    model, tokenizer = default_model(progress=False)
    questions = stratified_sample(load_questions(resolve_prompts(None)), N_PROMPTS)
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in questions]
    with torch.no_grad():
        refs = {
            i: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            for i, ids in enumerate(prompts)
            if i % PLAIN_EVERY == 0
        }
    longest = max(p.shape[1] for p in prompts)
    cache_len = max(SHARED_CACHE_LEN, -(-(longest + NEW_TOKENS) // 64) * 64)
    # One compile serves both tests: plain decoding is generate(speculate=False) on the same programs. The steps of
    # optimize(model, speculate=True, calibrate="full"), with QUICK settings: no second capture of the model.
    fast = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=cache_len)
    speculate_with(fast, calibrate_compiled(fast, CALIBRATION_PROMPTS, tokenizer=tokenizer, settings=QUICK))
    return model, tokenizer, questions, prompts, refs, fast


#: HF's own near-ties (top-2 logits within 1e-3) this file tolerates per test: each is printed; more than this
#: many means the compiled programs round differently far more often than rounding explains
MAX_NEAR_TIES = 2


def hf_greedy_departures(model, ids: torch.Tensor, out: torch.Tensor) -> list[dict]:
    """Where ``out`` (``ids`` and the tokens generated after them) departs from HF's greedy decoding, judged from
    one forward pass of the HF model over ``out`` instead of ``generate``'s step by step: the same logits up to
    rounding. Each departure gives its position, HF's token and the method's, and ``near_tie``: HF's best logit
    beats the method's token by less than the near-tie threshold. Stopping is judged as ``generate`` stops: at the
    first EOS, else after ``NEW_TOKENS``."""
    n = ids.shape[1]
    if not torch.equal(out[:, :n], ids):
        return [{"position": 0, "reason": "the output does not start with the prompt", "near_tie": False}]
    with torch.no_grad():
        logits = model(input_ids=out).logits[0, n - 1 : -1].float()
    generated = out[0, n:].tolist()
    departures = []
    for pos, (row, token) in enumerate(zip(logits, generated, strict=True)):
        best = int(row.argmax())
        if token != best:
            gap, top = float(row[best] - row[token]), float(row[best])
            tie = gap < near_tie_threshold(top, logits.dtype)
            departures.append({"position": pos, "hf_token": best, "method_token": token, "gap": gap, "near_tie": tie})
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    stops = [pos for pos, token in enumerate(generated) if token in eos]
    if (stops[0] + 1 if stops else NEW_TOKENS) != len(generated):
        departures.append({"position": len(generated), "reason": "stopped at a different length", "near_tie": False})
    return departures


def test_every_matched_weight_rebuilds_bit_for_bit(reference):
    """The blocks the compiled programs were given (the compile's packing) rebuild every weight they stand for."""
    from test_exact_lowbit import assert_matches_rebuild_exactly

    from specpass.passes.exact_lowbit import packing

    model, *_, fast = reference
    with packing(fast.packs):
        # 210 Q4_1 layers and the tied embedding/head as Q8_0 (one parameter)
        assert assert_matches_rebuild_exactly(model) == {"Q4_1": 210, "Q8_0": 1}


def test_the_forward_judge_agrees_with_generate_and_catches_a_changed_token_and_a_wrong_stop(reference):
    """``hf_greedy_departures`` finds nothing in HF ``generate``'s own outputs, and flags a changed token (not as a
    near-tie) and an output cut short."""
    model, _, _, prompts, refs, _ = reference
    for i, ref in refs.items():
        assert hf_greedy_departures(model, prompts[i], ref) == [], i
    # one that runs to NEW_TOKENS without an EOS, so that cut short it has stopped too early
    i = next(i for i, ref in refs.items() if ref.shape[1] - prompts[i].shape[1] == NEW_TOKENS)
    ids, ref = prompts[i], refs[i]
    changed = ref.clone()
    changed[0, ids.shape[1] + 5] = 0  # <|endoftext|> (not the chat's EOS), far below the chat's next token
    first = hf_greedy_departures(model, ids, changed)[0]
    assert (first["position"], first["method_token"], first["near_tie"]) == (5, 0, False), first
    assert hf_greedy_departures(model, ids, ref[:, :-1]) == [
        {"position": NEW_TOKENS - 1, "reason": "stopped at a different length", "near_tie": False}
    ]


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_inductor_greedy_equals_hf_on_default_model(reference, speculate, tmp_path):
    model, tokenizer, questions, prompts, refs, fast = reference
    cases = [(i, q, ids) for i, (q, ids) in enumerate(zip(questions, prompts, strict=True))]
    if not speculate:
        cases = [case for case in cases if case[0] in refs]
    assert fast.speculative
    near_ties, outputs, drafted = [], [], 0
    for i, q, ids in cases:
        out = fast.generate(ids, max_new_tokens=NEW_TOKENS, speculate=speculate)
        outputs.append(out)
        if i in refs:
            diff = compare_outputs(model, ids, refs[i], out)
            departures = [] if diff is None else [diff]
        else:
            departures = hf_greedy_departures(model, ids, out)
        for diff in departures:
            # Compiled kernels may round differently: tolerated only where HF's own top-2 logits nearly tie.
            assert diff["near_tie"], f"question {q['question_id']} ({q['category']}): {diff}"
            near_ties.append((q["question_id"], diff))
        assert fast.last_stats.new_tokens == out.shape[1] - ids.shape[1]
        drafted += sum(fast.last_stats.drafted)
    assert (drafted > 0) == speculate
    print(f"{len(cases)} prompts; near-ties tolerated: {near_ties or 'none'}")
    assert len(near_ties) <= MAX_NEAR_TIES, f"{len(near_ties)} near-ties in {len(cases)} prompts: {near_ties}"
    if speculate:
        # The engine file of this model reproduces it token for token (issue 4), from the same programs.
        from specpass.engine import load_engine, write_engine

        path = tmp_path / "default.specpass"
        manifest = write_engine(fast, path, tokenizer=tokenizer)
        # every matrix is stored as its GGUF blocks (exact_lowbit): 111.5 MB of weights instead of 538 MB
        assert {info["format"] for info in manifest["lowbit"].values()} == {"Q4_1", "Q8_0"}
        assert sum(info["fp32_blocks"] for info in manifest["lowbit"].values()) == 0
        # a prefill kind measured faster in fp32 here (kernels/choice.py) stores no fp32 weights: the decode
        # program's blocks rebuild them at load; only a decode kind kept in fp32 would store its own
        assert path.stat().st_size < 150e6 + _fp32_bytes(fast.lowbit_choices), (
            path.stat().st_size,
            fast.lowbit_choices,
        )
        if any(not r["lowbit"] for kind, r in fast.lowbit_choices.items() if kind.startswith("prefill")):
            assert manifest["rebuilt"]
        engine = load_engine(path)
        for (_, q, ids), want in list(zip(cases, outputs, strict=True))[:6]:
            assert torch.equal(engine.chat_ids(q["turns"][0]), ids)
            assert torch.equal(engine.generate(ids, max_new_tokens=NEW_TOKENS), want), q["question_id"]


def _fp32_bytes(choices: dict) -> int:
    """Bytes of the fp32 matrices of the decode kinds of call kept in fp32 (kind: regime|storage|NxK+NxK|xCOUNT)."""
    total = 0
    for kind, result in choices.items():
        if not result["lowbit"] and not kind.startswith("prefill"):
            _, _, shapes, count = kind.split("|")
            total += 4 * int(count[1:]) * sum(int(n) * int(k) for n, k in (s.split("x") for s in shapes.split("+")))
    return total


def test_bench_on_the_default_model(tmp_path):
    """``specpass bench`` with every method but hf_static_compile on the real model. specpass runs a given
    context-lookup plan: the default calibration (about 20 minutes on 2 cores) is what benchmarks measure, not what
    this test checks. It lives in this file so that it runs after the tests above in the same xdist worker:
    specpass's prefill and decode (SHARED_CACHE_LEN) then come from the program cache. hf_static_compile's
    torch.compile of this model would add 2-4 minutes to CI's longest worker; test_bench.py runs it on a tiny
    model."""
    from specpass.cli import main
    from specpass.tune.plan import SpecPlan

    out_json, plan = tmp_path / "r.json", tmp_path / "plan.json"
    SpecPlan(speculate=True, lookup=3, max_draft=0).save(plan)
    methods = [n for n in bench.DEFAULT_METHODS if n != "hf_static_compile"]
    args = ["--max-new-tokens", "8", "--max-cache-len", str(SHARED_CACHE_LEN), "--plan", str(plan)]
    rc = main(["bench", "--num-prompts", "1", "--methods", ",".join(methods), *args, "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert rc == 0, data["mismatches"]
    assert data["config"]["methods"] == [n for n in methods if n not in data["skipped"]]
    # peers that are not installed (CI does not build llama.cpp: pip install 'specpass[peers]' takes ~10 minutes)
    assert set(data["skipped"]) <= {"economize_layer_skip", "flashspec_lookup", "llamacpp", "llamacpp_lookup"}
    assert data["config"]["lowbit"]["isa"] == data["machine"]["isa"].lower().replace("-", "")
    assert data["config"]["lowbit"]["choices"]  # what was timed against fp32 on this CPU
    for name, s in data["summary"].items():
        assert s["identical"] or not s["lossless"], name
        assert s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"] > 0
