"""Tests for ``specpass bench``: prompt sampling, the side-by-side loop, its reports and its exit code.

The fast tests run the loop on a tiny random Llama with a byte-level tokenizer built here (no download);
the ``slow`` one runs ``specpass bench`` on the real default model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import specpass
from specpass import bench
from specpass.errors import SpecPassError
from specpass.tokenization import chat_ids

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Another one."]},
    {"question_id": 2, "category": "writing", "turns": ["Name a color."]},
    {"question_id": 3, "category": "math", "turns": ["What is 2+2?"]},
    {"question_id": 4, "category": "qa", "turns": ["Who are you?"]},
    {"question_id": 5, "category": "math", "turns": ["What is 3*3?"]},
]


def byte_tokenizer():
    """A byte-level tokenizer with ChatML special tokens: ids 0-2 special, 3-258 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_chat_model():
    """A 2-layer random Llama over the byte tokenizer's 259 ids; eos is <|im_end|>."""
    tok = byte_tokenizer()
    model = tiny_llama(
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,  # wide logits: no accidental near-ties
    ).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model, tok


@pytest.fixture(scope="module")
def tiny_chat():
    return tiny_chat_model()


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _shift_last_token(model, tokenizer, cfg):
    """A method that answers like HF eager except for a different last token."""
    reference = bench.METHODS["hf_eager"].setup(model, tokenizer, cfg).generate

    def run(ids):
        out = reference(ids).clone()
        out[0, -1] = (out[0, -1] + 1) % model.config.vocab_size
        return out

    return bench.Runner(run)


WRONG = bench.Method("wrong", "hf_eager with its last token changed", _shift_last_token)


def _eager_with_tau(model, tokenizer, cfg):
    """HF eager that reports a made-up tau (2.5 tokens per verify step) and a note."""
    reference = bench.METHODS["hf_eager"].setup(model, tokenizer, cfg).generate
    return bench.Runner(reference, tau=lambda: 2.5, note="tau is made up")


WITH_TAU = bench.Method("with_tau", "hf_eager reporting a tau", _eager_with_tau)


def run_small(model, tok, prompts_file, tmp_path, methods: str, registry=None, extra=()) -> tuple[int, dict, str]:
    """run_bench on 2 prompts, 6 new tokens (``extra`` options override): (exit code, JSON report, Markdown)."""
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = bench_args(
        "--prompts",
        str(prompts_file),
        "--num-prompts",
        "2",
        "--max-new-tokens",
        "6",
        "--methods",
        methods,
        "--threads",
        "1",
        "--json",
        str(out_json),
        "--markdown",
        str(out_md),
        *extra,
    )
    rc = bench.run_bench(args, model=model, tokenizer=tok, methods=registry)
    return rc, json.loads(out_json.read_text()), out_md.read_text()


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------
def test_stratified_sample_round_robins_over_categories_in_file_order():
    picked = bench.stratified_sample(QUESTIONS, 4)
    assert [q["question_id"] for q in picked] == [1, 3, 4, 2]
    assert [q["question_id"] for q in bench.stratified_sample(QUESTIONS, 99)] == [1, 3, 4, 2, 5]


def test_stratified_sample_of_the_dev_split_covers_the_categories():
    questions = bench.load_questions(bench.resolve_prompts(None))
    assert len(questions) == 240
    picked = bench.stratified_sample(questions, 13)
    assert len({q["category"] for q in picked}) == 13
    assert picked == bench.stratified_sample(questions, 13)


def test_missing_or_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(SpecPassError, match="no such file"):
        bench.resolve_prompts(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["ok"]}\n{"question_id": 2}\n')
    with pytest.raises(SpecPassError, match=r"bad.jsonl:2: expected a question_id"):
        bench.load_questions(bad)


def test_default_prompts_ship_with_the_package_and_their_license():
    path = bench.resolve_prompts(None)
    assert path.is_relative_to(Path(specpass.__file__).parent)  # no file outside the package
    assert len(bench.load_questions(path)) == 240
    assert "Apache License" in (path.parent / "LICENSE").read_text()


def test_default_prompts_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.runner, "_DEFAULT_PROMPTS", tmp_path / "dev.jsonl")
    with pytest.raises(SpecPassError, match="pass --prompts PATH"):
        bench.resolve_prompts(None)


def test_chat_ids_use_the_chat_template(tiny_chat):
    _, tok = tiny_chat
    ids = chat_ids(tok, "hi")
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_method_is_a_usage_error(tiny_chat, prompts_file):
    model, tok = tiny_chat
    args = bench_args("--prompts", str(prompts_file), "--methods", "hf_eager,warp_drive")
    with pytest.raises(SpecPassError, match="unknown method.*warp_drive"):
        bench.run_bench(args, model=model, tokenizer=tok)


def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(tiny_chat, prompts_file, tmp_path):
    _, tok = tiny_chat
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")

    def refused(flag, path):
        args = bench_args("--prompts", str(prompts_file), "--methods", "hf_eager", flag, str(path))
        with pytest.raises(SpecPassError, match=f"^{flag} ") as raised:
            bench.run_bench(args, model=None, tokenizer=tok)  # no model: refused before it would be loaded
        return str(raised.value)

    assert "is a directory" in refused("--json", tmp_path)
    assert f"{a_file} is a file, not a folder" in refused("--markdown", a_file / "sub" / "r.md")


def test_reports_are_written_whole_into_new_folders(tmp_path):
    from specpass.bench.report import write

    path = tmp_path / "a" / "b" / "r.json"
    write(str(path), "{}\n")
    assert path.read_text() == "{}\n"
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left beside it


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------
def test_bench_reports_identical_outputs(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    extra = ("--num-prompts", "3", "--max-new-tokens", "8", "--backend", "eager")
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,specpass", extra=extra)
    assert rc == 0

    printed = capsys.readouterr().out
    assert "| specpass |" in printed and "| math |" in printed
    assert data["exit_code"] == 0
    assert data["config"]["methods"] == ["hf_eager", "specpass"]
    assert data["config"]["max_cache_len"] % 64 == 0
    assert data["mismatches"] == []
    assert [p["question_id"] for p in data["prompts"]] == [1, 3, 4]
    for p in data["prompts"]:
        assert p["prompt_tokens"] > 0 and p["category"] in {"writing", "math", "qa"}
        for name in ("hf_eager", "specpass"):
            m = p["methods"][name]
            assert m["identical"] is True
            assert 1 <= m["new_tokens"] <= 8 and m["seconds"] > 0
        assert p["methods"]["specpass"]["new_tokens"] == p["methods"]["hf_eager"]["new_tokens"]
    s = data["summary"]
    assert s["hf_eager"]["ratio"] == pytest.approx(1.0)
    assert s["specpass"]["identical"] and s["specpass"]["mismatches"] == 0 and s["specpass"]["tokens_per_s"] > 0
    assert s["specpass"]["setup_s"] > 0 and s["specpass"]["warm_up_s"] > 0
    assert set(data["categories"]) == {"writing", "math", "qa"}
    assert data["machine"]["threads"] == 1 and data["machine"]["torch"] == torch.__version__
    assert data["command"].startswith("specpass bench --model default --prompts ")

    assert md.startswith("## SmolLM2-135M-Instruct: 3 Spec-Bench prompts, 8 new tokens")
    assert data["command"] in md and "| method | tokens/s |" in md and "| category |" in md
    assert "torch " + torch.__version__ in md


def test_a_wrong_method_fails_the_run(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    methods = {**bench.METHODS, "wrong": WRONG}
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,wrong", methods, ("--max-new-tokens", "8"))
    assert rc == 1

    printed = capsys.readouterr().out
    assert "MISMATCH: wrong on question 1" in printed and "FAILED" in printed
    assert data["exit_code"] == 1
    assert data["summary"]["wrong"]["identical"] is False
    assert data["summary"]["wrong"]["mismatches"] == 2
    for p, m in zip(data["prompts"], data["mismatches"], strict=True):
        wrong = p["methods"]["wrong"]
        assert wrong["identical"] is False
        assert m["method"] == "wrong" and m["position"] == wrong["new_tokens"] - 1
        assert m["near_tie"] is False and m["hf_top2_gap"] >= bench.NEAR_TIE
        assert m["method_token"] != m["hf_token"]


def test_near_ties_are_tolerated_and_reported(tiny_chat, prompts_file, monkeypatch, capsys):
    model, tok = tiny_chat
    monkeypatch.setattr(bench.compare, "_top2_gap", lambda model, prefix: (1e-5, bench.NEAR_TIE))
    args = bench_args(
        "--prompts", str(prompts_file), "--num-prompts", "2", "--max-new-tokens", "4", "--methods", "hf_eager,wrong"
    )
    methods = {**bench.METHODS, "wrong": WRONG}
    assert bench.run_bench(args, model=model, tokenizer=tok, methods=methods) == 0
    printed = capsys.readouterr().out
    assert "near-tie (tolerated): wrong on question 1" in printed
    assert "| wrong |" in printed and "2 near-tie(s)" in printed


# --------------------------------------------------------------------------------------------------------
# Peers, skips, tau
# --------------------------------------------------------------------------------------------------------
def test_default_methods_are_all_registered_methods_in_order():
    expected = (
        "hf_eager",
        "hf_static_compile",
        "hf_prompt_lookup",
        "hf_early_exit",
        "economize_layer_skip",
        "flashspec_lookup",
        "llamacpp",
        "llamacpp_lookup",
        "specpass_plain",
        "specpass",
    )
    assert bench.DEFAULT_METHODS == tuple(bench.METHODS) == expected
    assert [n for n, m in bench.METHODS.items() if not m.lossless] == ["llamacpp", "llamacpp_lookup"]
    assert bench_args().methods == ",".join(expected)


def test_early_exit_candidates_are_fractions_of_the_layers():
    assert bench.early_exit_candidates(30) == [8, 15, 22]
    assert bench.early_exit_candidates(4) == [1, 2, 3]
    assert bench.early_exit_candidates(2) == [1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_hf_assisted_methods_match_hf_eager(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    hf_log, seen = logging.getLogger("transformers"), _Records()
    hf_log.addHandler(seen)
    logging.Logger.warning_once.cache_clear()  # HF says each warning once per process
    try:
        rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,hf_prompt_lookup,hf_early_exit")
        assert not [m for m in seen.messages if "generation_config` together" in m]  # HF's own call, silenced
        ids = torch.tensor([[1, 2, 3]])
        logging.Logger.warning_once.cache_clear()
        with torch.no_grad():  # the same HF call outside the bench: the notice the bench keeps out of its output
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, assistant_early_exit=1)
        assert [m for m in seen.messages if "generation_config` together" in m]
    finally:
        hf_log.removeHandler(seen)
    assert rc == 0 and data["mismatches"] == [] and data["skipped"] == {}
    for name in ("hf_prompt_lookup", "hf_early_exit"):
        s = data["summary"][name]
        assert s["identical"] and s["tau"] is None
        assert s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"] > 0
    assert data["summary"]["hf_early_exit"]["note"].startswith("assistant_early_exit=1 of 2 layers")
    assert data["summary"]["hf_prompt_lookup"]["note"] == "prompt_lookup_num_tokens=10"
    assert "- hf_early_exit: assistant_early_exit=1 of 2 layers" in md
    assert "| method | tokens/s | vs hf_eager | tau |" in capsys.readouterr().out


def _static_compile_without_warm_up(model, tokenizer, cfg):
    """hf_static_compile whose first compile falls into the timed prompts."""
    return dataclasses.replace(bench.METHODS["hf_static_compile"].setup(model, tokenizer, cfg), warm_up_runs=0)


def test_hf_static_compile_matches_hf_eager_and_compiles_only_in_its_warm_up(tiny_chat, prompts_file, tmp_path):
    model, tok = tiny_chat
    torch._dynamo.reset()  # graphs an earlier test compiled for the same code would hide the compiles counted here
    extra = ("--num-prompts", "3", "--max-new-tokens", "8")
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,hf_static_compile", extra=extra)
    assert rc == 0 and data["mismatches"] == []
    s = data["summary"]["hf_static_compile"]
    assert s["identical"] and s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"]
    # two warm-up prompts of different lengths compile the static prefill, its symbolic recompile and decode
    assert s["graphs_compiled_while_timed"] == 0 and "WARNING" not in md

    # the negative control: without the warm-up, the count catches the compiles in the timed prompts
    torch._dynamo.reset()
    cold = bench.Method("cold", "hf_static_compile without its warm-up", _static_compile_without_warm_up)
    extra = ("--num-prompts", "1", "--max-new-tokens", "4")
    rc, data, md = run_small(
        model, tok, prompts_file, tmp_path, "hf_eager,cold", {**bench.METHODS, "cold": cold}, extra
    )
    assert rc == 0 and data["summary"]["cold"]["identical"]
    assert data["summary"]["cold"]["graphs_compiled_while_timed"] > 0 and "WARNING: cold compiled" in md


@pytest.mark.parametrize(
    ("name", "package"), [("economize_layer_skip", "economize"), ("flashspec_lookup", "flashspec")]
)
def test_pypi_peers_match_hf_eager(name, package, tiny_chat, prompts_file, tmp_path):
    pytest.importorskip(package)
    model, tok = tiny_chat
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, f"hf_eager,{name}")
    assert rc == 0 and data["mismatches"] == [] and data["skipped"] == {}
    s = data["summary"][name]
    assert s["identical"] and s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"]
    assert s["tau"] is not None and s["tau"] >= 1.0
    assert s["note"].startswith(package)
    for p in data["prompts"]:
        assert p["methods"][name]["tau"] >= 1.0


def test_a_missing_peer_package_is_reported_as_skipped(tiny_chat, prompts_file, tmp_path, monkeypatch, capsys):
    model, tok = tiny_chat
    monkeypatch.setitem(sys.modules, "economize", None)  # import economize raises ImportError
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,economize_layer_skip")
    assert rc == 0
    assert data["config"]["methods"] == ["hf_eager"] and set(data["summary"]) == {"hf_eager"}
    why = data["skipped"]["economize_layer_skip"]
    assert "economize is not installed" in why and "pip install economize" in why
    printed = capsys.readouterr().out
    for text in (printed, md):
        assert "| economize_layer_skip | | | | | | skipped: economize is not installed" in text
        assert "SKIPPED: economize_layer_skip: economize is not installed" in text


FAKE_LLAMA_CPP = """
import json, os, signal

import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0-test"


def _log(kind, value):
    with open(os.environ["FAKE_LLAMA_CPP_LOG"], "a") as f:
        f.write(json.dumps([kind, value]) + "\\n")


def llama_print_system_info():
    return os.environ.get("FAKE_LLAMA_CPP_SYSTEM_INFO", "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | OPENMP = 1 |").encode()


class Llama:
    def __init__(self, **kwargs):
        _log("created", kwargs)
        if os.environ.get("FAKE_LLAMA_CPP_CRASH_AT") == "load":
            os.kill(os.getpid(), signal.SIGSEGV)
        self.model = AutoModelForCausalLM.from_pretrained(os.environ["FAKE_LLAMA_CPP_MODEL"]).eval()
        self.cached = 0  # tokens in the KV cache: generate(reset=True) would reuse a shared prefix of them
        self.calls = 0

    def reset(self):
        self.cached = 0

    def generate(self, tokens, reset=True, **sampling):
        assert reset and sampling["temp"] == 0.0 and sampling["repeat_penalty"] == 1.0
        assert self.cached == 0, "every prompt is prefilled in full: reset() before generate()"
        self.calls += 1
        if str(self.calls) == os.environ.get("FAKE_LLAMA_CPP_CRASH_AT"):
            os.kill(os.getpid(), signal.SIGSEGV)  # what a fault inside llama.cpp does to its process
        self.cached = len(tokens)
        _log("prompt", list(tokens))
        ids = torch.tensor([tokens])
        with torch.no_grad():
            mask = torch.ones_like(ids)  # the prompt holds <|im_end|>, the pad id: not padding
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
        wrong = os.environ.get("FAKE_LLAMA_CPP_WRONG") == "1"
        for i, t in enumerate(out[0, ids.shape[1] :].tolist()):
            yield (t + 1) % self.model.config.vocab_size if wrong and i == 5 else t
"""


def fake_llama_cpp(model, tmp_path, monkeypatch, *, wrong_last: bool = False, crash_at: int | str = 0) -> Path:
    """A stand-in for llama-cpp-python, as a package on ``sys.path`` (the bench imports it in a child process):
    ``Llama(...).generate(tokens)`` yields the tiny model's greedy tokens forever (as llama.cpp does; the caller
    stops), the 6th one changed when ``wrong_last``; the ``crash_at``-th generate ends its process with SIGSEGV
    ("load": its constructor does).
    Refuses a generate whose KV cache was not reset. Returns the file its calls are logged to."""
    package = tmp_path / "fake_peers" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    (package / "llama_speculative.py").write_text(
        "def LlamaPromptLookupDecoding(num_pred_tokens):\n    return ['lookup', num_pred_tokens]\n"
    )
    model.save_pretrained(tmp_path / "fake_peers" / "model")
    calls = tmp_path / "fake_peers" / "calls.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_CPP_MODEL", str(tmp_path / "fake_peers" / "model"))
    monkeypatch.setenv("FAKE_LLAMA_CPP_LOG", str(calls))
    monkeypatch.setenv("FAKE_LLAMA_CPP_WRONG", "1" if wrong_last else "0")
    monkeypatch.setenv("FAKE_LLAMA_CPP_CRASH_AT", str(crash_at))
    for name in ("llama_cpp", "llama_cpp.llama_speculative"):  # a real one imported by an earlier test
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(package.parent))  # the spawned child gets the parent's sys.path
    return calls


def logged(calls: Path, kind: str) -> list:
    return [value for k, value in map(json.loads, calls.read_text().splitlines()) if k == kind]


@pytest.mark.parametrize("wrong", [False, True])
def test_llamacpp_gets_the_prompt_ids_and_its_differences_do_not_fail_the_run(
    wrong, tiny_chat, prompts_file, tmp_path, monkeypatch, capsys
):
    model, tok = tiny_chat
    calls = fake_llama_cpp(model, tmp_path, monkeypatch, wrong_last=wrong)
    gguf = tmp_path / "model.gguf"
    extra = ("--gguf", str(gguf), "--max-new-tokens", "8")
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp,llamacpp_lookup", extra=extra)
    assert rc == 0 and data["skipped"] == {}
    first, lookup = logged(calls, "created")
    assert first["model_path"] == str(gguf) and first["n_threads"] == first["n_threads_batch"] == 1
    assert "draft_model" not in first and lookup["draft_model"] == ["lookup", bench.methods.LLAMACPP_LOOKUP_TOKENS]
    assert lookup["logits_all"] is True  # verification reads every drafted position's logits
    timed = {p["question_id"] for p in data["prompts"]}
    expected = [chat_ids(tok, q["turns"][0])[0].tolist() for q in QUESTIONS if q["question_id"] in timed]
    # exactly the ids every method gets (llama.cpp's own tokenizer is not in the loop), after the warm-ups
    assert sorted(logged(calls, "prompt")[-4:]) == sorted(expected * 2)
    for name in ("llamacpp", "llamacpp_lookup"):
        s = data["summary"][name]
        assert s["lossless"] is False and s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"]
        assert s["identical"] is not wrong
    printed = capsys.readouterr().out
    if wrong:
        assert "no (2 prompt(s) differ; not lossless)" in printed and "FAILED" not in printed
        assert "llamacpp is not lossless by design: its output equals hf_eager's on 0 of 2 prompts" in printed
        assert "MISMATCH" not in printed  # listed for lossless methods only
    assert "llama-cpp-python 0.0-test (built for SSE3 AVX AVX2), model.gguf, 1 threads" in md


def test_a_crash_inside_llamacpp_fails_that_method_not_the_run(tiny_chat, prompts_file, tmp_path, monkeypatch):
    """A segfault in llama.cpp (as its AMX product gives on some Xeons) ends its own process: the bench reports
    the method as failed, with the signal, and the others keep their table."""
    model, tok = tiny_chat
    fake_llama_cpp(model, tmp_path, monkeypatch, crash_at=2)  # the warm-up passes, the first timed prompt crashes
    extra = ("--gguf", str(tmp_path / "model.gguf"))
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp", extra=extra)
    assert rc == 0 and list(data["summary"]) == ["hf_eager"]
    assert "LlamaCppDied: llama.cpp's process died (SIGSEGV) while generating" in data["skipped"]["llamacpp"]
    monkeypatch.setenv("FAKE_LLAMA_CPP_CRASH_AT", "load")  # as the crash in the dspy CI of llama.cpp#20824
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp", extra=extra)
    assert rc == 0 and list(data["summary"]) == ["hf_eager"]
    assert "llama.cpp's process died (SIGSEGV) while loading the model" in data["skipped"]["llamacpp"]


def test_llamacpp_needs_its_package_and_a_gguf_file(tiny_chat, prompts_file, tmp_path, monkeypatch):
    model, tok = tiny_chat
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp")
    assert rc == 0 and "pip install 'specpass[peers]'" in data["skipped"]["llamacpp"]
    fake_llama_cpp(model, tmp_path, monkeypatch)
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp")  # an injected model: no GGUF
    assert rc == 0 and "llama.cpp runs GGUF files" in data["skipped"]["llamacpp"]


def test_a_llamacpp_build_wider_than_the_cpu_level_is_refused(tiny_chat, prompts_file, tmp_path, monkeypatch):
    """Run as an AVX2 CPU (``SPECPASS_CPU_LEVEL``), llama.cpp built with AVX-512 would be the faster CPU's peer: the
    method is refused with the build that fits, and the other methods run."""
    model, tok = tiny_chat
    fake_llama_cpp(model, tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_LLAMA_CPP_SYSTEM_INFO", "CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 0 |")
    monkeypatch.setenv("SPECPASS_CPU_LEVEL", "avx2")
    extra = ("--gguf", str(tmp_path / "model.gguf"), "--max-new-tokens", "8")
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp", extra=extra)
    why = data["skipped"]["llamacpp"]
    assert rc == 0 and list(data["summary"]) == ["hf_eager"]
    assert "SPECPASS_CPU_LEVEL=avx2 but this llama.cpp is built with AVX512, AVX512_VNNI" in why
    assert "-DGGML_AVX2=ON" in why and "LLAMA_CPP_LIB_PATH=DIR/llama_cpp/lib" in why
    monkeypatch.setenv("FAKE_LLAMA_CPP_SYSTEM_INFO", "CPU : AVX = 1 | AVX2 = 1 | FMA = 1 | AVX512 = 0 |")
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,llamacpp", extra=extra)
    assert rc == 0 and data["skipped"] == {} and "(built for AVX AVX2 FMA)" in md
    assert data["command"].startswith("SPECPASS_CPU_LEVEL=avx2 specpass bench --model")  # reproduces the level


def _failing(after: int):
    """A method whose runner raises from its ``after``-th call on (warm-up calls included)."""
    calls = []

    def setup(model, tokenizer, cfg):
        def run(ids):
            calls.append(1)
            if len(calls) > after:
                raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
            return bench.METHODS["hf_eager"].setup(model, tokenizer, cfg).generate(ids)

        return bench.Runner(run)

    return setup


@pytest.mark.parametrize("after, where", [(0, "in warm-up"), (2, "on question")])
def test_a_peer_that_fails_is_dropped_and_the_rest_reported(after, where, tiny_chat, prompts_file, tmp_path):
    """A peer that fails in warm-up or part way through the timed prompts (flashspec on Gemma's long prompts)
    is reported as skipped, with the error, and its runs so far dropped; the others keep their table."""
    model, tok = tiny_chat
    registry = {**bench.METHODS, "broken": bench.Method("broken", "", _failing(after))}
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,broken,hf_prompt_lookup", registry)
    assert rc == 0
    assert set(data["summary"]) == {"hf_eager", "hf_prompt_lookup"} and data["summary"]["hf_prompt_lookup"]["identical"]
    assert all(set(p["methods"]) == {"hf_eager", "hf_prompt_lookup"} for p in data["prompts"])
    why = data["skipped"]["broken"]
    assert why.startswith(f"failed {where}") and "RuntimeError: accessing tensor output of CUDAGraphs" in why
    assert "SKIPPED: broken: failed " in md


def test_a_failure_of_specpass_itself_fails_the_bench(tiny_chat, prompts_file, tmp_path):
    model, tok = tiny_chat
    registry = {**bench.METHODS, "specpass": bench.Method("specpass", "", _failing(0), own=True)}
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,specpass", registry)
    assert rc == 1 and data["skipped"]["specpass"].startswith("failed in warm-up: RuntimeError")
    assert set(data["summary"]) == {"hf_eager"}


def test_an_unavailable_reference_is_an_error(tiny_chat, prompts_file, tmp_path):
    model, tok = tiny_chat

    def unavailable(model, tokenizer, cfg):
        raise bench.MethodUnavailable("no")

    registry = {**bench.METHODS, "hf_eager": bench.Method("hf_eager", "", unavailable)}
    with pytest.raises(bench.MethodUnavailable):
        run_small(model, tok, prompts_file, tmp_path, "hf_eager", registry)


def test_tau_is_reported_where_a_runner_has_it(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    rc, data, md = run_small(
        model, tok, prompts_file, tmp_path, "hf_eager,with_tau", {**bench.METHODS, "with_tau": WITH_TAU}
    )
    assert rc == 0
    assert data["summary"]["with_tau"]["tau"] == pytest.approx(2.5)
    assert data["summary"]["hf_eager"]["tau"] is None
    assert [p["methods"]["with_tau"]["tau"] for p in data["prompts"]] == [2.5, 2.5]
    assert data["summary"]["with_tau"]["note"] == "tau is made up"
    printed = capsys.readouterr().out
    for text in (printed, md):
        rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
        assert "| 2.50 |" in rows["| with_tau"]
        assert "x |  | " in rows["| hf_eager"]  # blank tau
        assert "with_tau: tau is made up" in text


def test_specpass_methods_share_one_optimize_and_read_tau(monkeypatch):
    """specpass and specpass_plain share one optimize() per run; plain generates with speculate=False, specpass
    as the plan says; tau comes from last_stats.tau."""
    import specpass

    calls, generated = [], []

    class FakeSpecModel:
        compile_s = 0.0
        last_stats = None
        plan = None

        def generate(self, ids, **kwargs):
            generated.append(kwargs["speculate"])
            self.last_stats = types.SimpleNamespace(tau=1.75)
            return ids

    def fake_optimize(model, **kwargs):
        calls.append(kwargs)
        return FakeSpecModel()

    monkeypatch.setattr(specpass, "optimize", fake_optimize)
    methods = ("specpass_plain", "specpass")
    cfg = bench.BenchConfig(max_new_tokens=4, max_cache_len=64, backend="eager", methods=methods)
    plain = bench.METHODS["specpass_plain"].setup(None, "tok", cfg)
    default = bench.METHODS["specpass"].setup(None, "tok", cfg)
    # one compile for both, with the plan that specpass needs
    assert calls == [
        {
            "speculate": "auto",
            "tokenizer": "tok",
            "plan": None,
            "backend": "eager",
            "max_cache_len": 64,
            "exact_lowbit": True,
        }
    ]
    assert default.tau() is None  # no generation yet
    default.generate(torch.zeros(1, 3, dtype=torch.long))
    assert default.tau() == 1.75
    plain.generate(torch.zeros(1, 3, dtype=torch.long))
    assert generated == [None, False]
    monkeypatch.setattr(FakeSpecModel, "generate", lambda self, ids, **kw: ids)  # stats without tau
    fresh = bench.METHODS["specpass"].setup(None, None, bench.BenchConfig(max_new_tokens=4, max_cache_len=64))
    fresh.generate(torch.zeros(1, 3, dtype=torch.long))
    assert fresh.tau() is None and len(calls) == 2  # a new run compiles again
    # specpass_plain alone: no plan, so no calibration
    bench.METHODS["specpass_plain"].setup(None, "tok", bench.BenchConfig(4, 64, "eager", methods=("specpass_plain",)))
    assert calls[-1]["speculate"] is False


def test_reference_is_added_when_missing(tiny_chat, prompts_file):
    args = bench_args("--methods", "wrong")
    assert bench.runner._parse_methods(args.methods, {**bench.METHODS, "wrong": WRONG}) == ["hf_eager", "wrong"]


def test_too_small_cache_is_a_usage_error(tiny_chat, prompts_file):
    model, tok = tiny_chat
    args = bench_args("--prompts", str(prompts_file), "--max-cache-len", "16", "--methods", "hf_eager")
    with pytest.raises(SpecPassError, match="--max-cache-len 16 is too small"):
        bench.run_bench(args, model=model, tokenizer=tok)


# --------------------------------------------------------------------------------------------------------
# Devices, dtypes, plans, near-ties in half precision
# --------------------------------------------------------------------------------------------------------
def test_bad_devices_and_plans_are_clear_errors(tiny_chat, prompts_file, tmp_path):
    with pytest.raises(SpecPassError, match="not a device"):
        bench.bench_device("warp:0")
    with pytest.raises(SpecPassError, match="specpass runs on cpu or cuda"):
        bench.bench_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(SpecPassError, match="sees no CUDA GPU"):
            bench.bench_device("cuda")
    model, tok = tiny_chat
    with pytest.raises(SpecPassError, match="cannot read the SpecPlan"):
        run_small(model, tok, prompts_file, tmp_path, "hf_eager,specpass", extra=("--plan", str(tmp_path / "no")))


def test_bench_runs_a_given_plan_in_bf16(prompts_file, tmp_path):
    """``--dtype bfloat16 --plan P``: every method in bf16, specpass with that plan (no calibration)."""
    from specpass.tune.plan import SpecPlan

    model, tok = tiny_chat_model()
    plan = tmp_path / "plan.json"
    SpecPlan(speculate=True, lookup=2, max_draft=0).save(plan)
    extra = ("--dtype", "bfloat16", "--plan", str(plan), "--backend", "eager")
    rc, data, md = run_small(model, tok, prompts_file, tmp_path, "hf_eager,specpass_plain,specpass", extra=extra)
    assert rc == 0 and data["config"]["dtype"] == "bfloat16" and data["config"]["device"] == "cpu"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "context lookup of up to 2 tokens" in data["summary"]["specpass"]["note"]
    assert "--dtype bfloat16 --plan" in data["command"] and "bfloat16 on cpu" in md


def test_near_tie_threshold_is_two_ulps_in_half_precision():
    assert bench.near_tie_threshold(20.0, torch.float32) == bench.NEAR_TIE
    assert bench.near_tie_threshold(3.0, torch.bfloat16) == 2 * 2**-6  # bf16 steps of 2^-6 in [2, 4)
    assert bench.near_tie_threshold(-20.0, torch.bfloat16) == 2 * 2**-3
    assert bench.near_tie_threshold(3.0, torch.float16) == max(bench.NEAR_TIE, 2 * 2**-9)
    assert bench.near_tie_threshold(0.0, torch.bfloat16) == bench.NEAR_TIE


# --------------------------------------------------------------------------------------------------------
# Repeats and the speed gate
# --------------------------------------------------------------------------------------------------------
def _flaky(model, tokenizer, cfg):
    """HF eager, except that from its second timed repeat on it answers with a different last token."""
    reference = bench.METHODS["hf_eager"].setup(model, tokenizer, cfg).generate
    calls = {"n": 0}

    def run(ids):
        calls["n"] += 1
        out = reference(ids).clone()
        if calls["n"] > 1 + 2:  # one warm-up, then the first repeat's 2 prompts
            out[0, -1] = (out[0, -1] + 1) % model.config.vocab_size
        return out

    return bench.Runner(run)


EXTRA = {**bench.METHODS, "with_tau": WITH_TAU, "flaky": bench.Method("flaky", "changes after a repeat", _flaky)}


def test_repeats_report_the_median_ratio(tiny_chat, prompts_file, tmp_path):
    model, tok = tiny_chat
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,with_tau", EXTRA, ("--repeats", "3"))
    assert rc == 0 and data["config"]["repeats"] == 3 and "--repeats 3" in data["command"]
    s = data["summary"]["with_tau"]
    assert len(s["ratios"]) == 3 and s["ratio"] == pytest.approx(sorted(s["ratios"])[1])
    assert data["summary"]["hf_eager"]["ratios"] == [1.0, 1.0, 1.0]
    assert data["repeat_differences"] == []


def test_output_that_changes_between_repeats_fails(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    rc, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,flaky", EXTRA, ("--repeats", "2"))
    assert rc == 1
    assert [d["repeat"] for d in data["repeat_differences"]] == [2, 2]
    assert "MISMATCH: flaky on question 1: repeat 2 gave other tokens than the first" in capsys.readouterr().out


def test_speed_gate_fails_a_method_slower_than_its_baseline(tiny_chat, prompts_file, tmp_path, capsys):
    model, tok = tiny_chat
    _, data, _ = run_small(model, tok, prompts_file, tmp_path, "hf_eager,with_tau", EXTRA)
    base = tmp_path / "base.json"

    def gate(ratio: float, **machine) -> int:
        summary = {**data["summary"], "with_tau": {**data["summary"]["with_tau"], "ratio": ratio}}
        base.write_text(json.dumps({**data, "summary": summary, "machine": {**data["machine"], **machine}}))
        extra = ("--baseline", str(base), "--max-slowdown", "0.1")
        return run_small(model, tok, prompts_file, tmp_path / "gate", "hf_eager,with_tau", EXTRA, extra)[0]

    (tmp_path / "gate").mkdir()
    assert gate(1000.0) == 1
    printed = capsys.readouterr().out
    assert "speed gate: with_tau 1000.00x -> " in printed and "SLOWER by more than 10%" in printed
    assert "FAILED: with_tau" in printed
    assert json.loads((tmp_path / "gate" / "r.json").read_text())["gate"]["slower"] == ["with_tau"]

    assert gate(0.001) == 0
    printed = capsys.readouterr().out
    assert "speed gate: with_tau 0.00x -> " in printed and "): ok" in printed and printed.rstrip().endswith("passed")
    with pytest.raises(SpecPassError, match="ran with cpu 'Another CPU'"):
        gate(1.0, cpu="Another CPU")
    with pytest.raises(SpecPassError, match="ran with threads 2, this run has 1"):
        gate(1.0, threads=2)
    with pytest.raises(SpecPassError, match="no such file"):
        run_small(model, tok, prompts_file, tmp_path, "hf_eager", EXTRA, ("--baseline", str(tmp_path / "none")))
    with pytest.raises(SpecPassError, match="max-slowdown is a fraction"):
        run_small(model, tok, prompts_file, tmp_path, "hf_eager", EXTRA, ("--max-slowdown", "1.5"))


def test_the_fp32_order_specpass_timed_is_noted():
    from specpass.bench.report import _order_info, _order_note

    untimed = {"kind": "order|few_tokens|4x4", "linear_ms": None, "stationary_ms": None, "stationary": True}
    timed = {"kind": "order|few_tokens|8x4", "linear_ms": 1.0, "stationary_ms": 2.0, "stationary": False}
    cfg = bench.BenchConfig(4, 64)
    cfg.shared["spec_model"] = types.SimpleNamespace(order_choices={r["kind"]: r for r in (untimed, timed)})
    info = _order_info(cfg)
    assert info == {timed["kind"]: timed}  # only what was timed on this CPU
    assert _order_note(info) == (
        "specpass fp32 products of a few tokens: linear for 1 and W @ x.T for 0 of 1 shapes of weight "
        "(both timed on this CPU)"
    )
    assert _order_info(bench.BenchConfig(4, 64)) is None  # no specpass method ran
