"""Engine files on a tiny chat model (AOTInductor): write, load, generate, the CLI, and every bad-file case."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import types
import zipfile

import pytest
import torch
from test_bench import tiny_chat_model

import specpass
from specpass import machine
from specpass.cli import main
from specpass.engine import MANIFEST, RECYCLED, WEIGHTS, load_engine, read_manifest, write_engine
from specpass.errors import SpecPassError
from specpass.lower import inductor as inductor_lowering
from specpass.tokenization import chat_ids
from specpass.tune.plan import SpecPlan

#: draft trees: lookup first, then an early-exit draft program's EAGLE-2 tree (top-2 per level), then
#: recycled tokens; the engine holds prefill, decode (which verifies the trees) and draft
PLAN = SpecPlan(
    speculate=True,
    lookup=2,
    exit_layer=0,
    max_draft=2,
    threshold=0.0,
    adaptive=False,
    tree_budget=6,
    tree_template=[[0, 0], [0, 1], [1, 0]],
    draft_topk=2,
)
PROMPT = "hello there"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The tiny chat model saved as a model directory, and its engine written by ``specpass compile``."""
    tmp = tmp_path_factory.mktemp("engine")
    model, tok = tiny_chat_model()
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    PLAN.save(tmp / "plan.json")
    path = tmp / "tiny.specpass"
    rc = main(
        ["compile", str(tmp / "model"), "-o", str(path), "--plan", str(tmp / "plan.json"), "--max-cache-len", "64"]
    )
    assert rc == 0
    return model, tok, path, read_manifest(path)


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def test_engine_reproduces_the_model(compiled):
    model, tok, path, manifest = compiled
    assert sorted(manifest["programs"]) == ["decode", "draft", "prefill"]
    engine = load_engine(path)
    ids = chat_ids(tok, PROMPT)
    assert torch.equal(engine.chat_ids(PROMPT), ids)  # the chat template, rendered without transformers
    out = engine.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, _hf(model, ids, 24))
    assert engine.speculative and engine.plan == PLAN
    assert engine.last_stats.tree_nodes > engine.last_stats.steps  # it verified trees, not single tokens
    assert "tree_verify" in [h["pass"] for h in manifest["tree_verify"]["passes"]]
    assert engine.decode(out[0, ids.shape[1] :]) == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_engine_stores_the_weights_once(compiled):
    model, _, path, manifest = compiled
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    with zipfile.ZipFile(path) as z:
        stored = z.getinfo(WEIGHTS).file_size
        packages = [z.getinfo(p["package"]).file_size for p in manifest["programs"].values()]
    # Three programs do not mean three copies: the weights are stored once, and no package holds them.
    assert manifest["weight_bytes"] <= 1.2 * weight_bytes
    assert stored <= 1.2 * weight_bytes + 65536  # + the safetensors header
    assert all(size < stored for size in packages) or weight_bytes < 1e6  # tiny weights: the .so code dominates
    bindings = [set(p["constants"].values()) for p in manifest["programs"].values()]
    assert len(set.union(*bindings)) < sum(len(b) for b in bindings)  # programs share stored tensors


def _as_spec_model(model, engine):
    """What write_engine reads of a SpecModel, from a loaded engine's AOTInductor programs (no recompile)."""
    return types.SimpleNamespace(
        model=model,
        programs=engine.programs,
        backend="inductor",
        summaries={},
        generation_config=model.generation_config,
        vocab_size=engine.vocab_size,
        spec=engine.spec,
        plan=engine.plan,
        recycled=engine.recycled,
        cache=engine.cache,
        isa=engine.manifest["cpu"]["isa"],
    )


def test_engine_keeps_the_recycled_token_table(compiled, tmp_path):
    """A table warmed before the engine was written drafts from the start after loading (Token Recycling)."""
    model, tok, path, manifest = compiled
    assert manifest["recycled_tokens"] == 0 and RECYCLED not in manifest["payloads"]
    engine = load_engine(path)
    engine.generate(chat_ids(tok, PROMPT), max_new_tokens=16, do_sample=False)
    warm = write_engine(_as_spec_model(model, engine), tmp_path / "warm.specpass")
    assert warm["recycled_tokens"] == len(engine.recycled.next) > 0
    loaded = load_engine(tmp_path / "warm.specpass")
    assert loaded.recycled.next == engine.recycled.next
    ids = chat_ids(tok, "tell me more")
    assert torch.equal(loaded.generate(ids, max_new_tokens=16, do_sample=False), _hf(model, ids, 16))


def test_engine_runs_dynamic_exit_plans(tmp_path):
    """DEL's programs (a draft per exit, the verify with each exit's tokens) and its costs travel in the engine."""
    model, tok = tiny_chat_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    plan = SpecPlan(speculate=True, del_exits=[0], max_draft=3, threshold=0.0, adaptive=False)
    plan.save(tmp_path / "plan.json")
    path = tmp_path / "del.specpass"
    args = [str(tmp_path / "model"), "-o", str(path), "--plan", str(tmp_path / "plan.json"), "--max-cache-len", "64"]
    assert main(["compile", *args]) == 0
    assert sorted(read_manifest(path)["programs"]) == ["decode", "draft_exit0", "prefill", "verify_exits"]
    engine = load_engine(path)
    assert engine.speculative and len(engine.plan.del_costs) == 1
    ids = chat_ids(tok, PROMPT)
    assert torch.equal(engine.generate(ids, max_new_tokens=24, do_sample=False), _hf(model, ids, 24))
    assert engine.last_stats.steps < 24  # tokens were drafted and accepted, not only plain steps


def test_run_cli_needs_no_transformers_modeling_code(compiled):
    model, tok, path, _ = compiled
    script = (
        "import json, sys\n"
        "from specpass.cli import main\n"
        f"rc = main(['run', {str(path)!r}, '--prompt', {PROMPT!r}, '--max-new-tokens', '12', '--json'])\n"
        "bad = sorted(m for m in sys.modules if m.startswith('transformers'))\n"
        "print(json.dumps({'rc': rc, 'transformers': bad}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, last = proc.stdout.strip().splitlines()[-2:]
    result, env = json.loads(first), json.loads(last)
    assert env == {"rc": 0, "transformers": []}
    ids = chat_ids(tok, PROMPT)
    want = _hf(model, ids, 12)[0, ids.shape[1] :].tolist()
    assert result["token_ids"] == want and result["stats"]["new_tokens"] == len(want)
    assert result["text"] == tok.decode(want, skip_special_tokens=True)


def test_run_cli_streams_and_samples(compiled, capsys):
    _, tok, path, _ = compiled
    assert main(["run", str(path), "--prompt", PROMPT, "--max-new-tokens", "8", "--stream"]) == 0
    streamed = capsys.readouterr()
    assert "tokens/s" in streamed.err
    assert streamed.err.count("an engine file is native code") == 1  # said once, without --trust
    assert main(["run", str(path), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]) == 0
    assert streamed.out.strip() == json.loads(capsys.readouterr().out)["text"].strip()
    runs = []
    for _ in range(2):
        args = ["--temperature", "0.8", "--seed", "3", "--max-new-tokens", "8", "--json"]
        assert main(["run", str(path), "--prompt", PROMPT, *args]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]  # seeded sampling repeats
    assert main(["run", str(path), "--prompt", PROMPT, "--raw", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["prompt_tokens"] == len(tok(PROMPT).input_ids)
    assert main(["run", str(path), "--prompt", PROMPT, "--max-new-tokens", "100"]) == 2
    assert "compile the engine again with a larger --max-cache-len" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--temperature", "0.7", "--top-p", "2"], r"--top-p must be in \(0, 1\], got 2.0"),
        (["--temperature", "0.7", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
        (["--top-p", "0.9", "--seed", "0"], "--top-p, --seed only apply when sampling.*add --temperature T"),
    ],
)
def test_run_cli_refuses_bad_or_ignored_options_before_loading(options, message, tmp_path, capsys):
    # no such engine: the options are refused before it is read
    assert main(["run", str(tmp_path / "none.specpass"), "--prompt", PROMPT, *options]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "native code" not in err


def test_inspect_cli(compiled, capsys):
    _, _, path, manifest = compiled
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in (
        "program     draft",
        "insert_early_exit",
        "input_ids: i64[1, ",
        "context lookup",
        "stored once",
        "checked by: fold_gqa_heads, fused_attention, inline_attention, exact_lowbit, linear_operand_order, tree_verify",
        "signed      no",
        "native code",
        f"cpu         programs for {_LEVEL_NAMES[manifest['cpu']['isa']]} CPUs, compiled on {machine.cpu_model()}",
    ):
        assert text in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**manifest, "signed_by": None}


_LEVEL_NAMES = {
    "avx512": "AVX-512 (x86-64-v4)",
    "avx2": "AVX2 (x86-64-v3)",
    "generic": "any x86-64",
    "native": "native (this CPU)",
}


def test_inspect_says_why_there_is_no_speculation_once(compiled, tmp_path, capsys):
    _, _, path, _ = compiled
    plain = json.loads(SpecPlan(speculate=False, reason="lookup lost to plain decoding").to_json())
    _rewrite(path, tmp_path / "plain.specpass", edit_manifest=lambda m: m.update(plan=plain))
    assert main(["inspect", str(tmp_path / "plain.specpass")]) == 0
    out = capsys.readouterr().out
    assert "plan        no speculation (lookup lost to plain decoding)" in out
    assert out.count("lookup lost to plain decoding") == 1


# ---- bad engine files ------------------------------------------------------------------------------------
def _rewrite(src, dst, edit_manifest=None, edit_entry=None):
    """Copy an engine, changing its manifest (a function of the dict) or one entry's bytes (name, function)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == MANIFEST and edit_manifest is not None:
                manifest = json.loads(data)
                edit_manifest(manifest)
                data = json.dumps(manifest).encode()
            if edit_entry is not None and info.filename == edit_entry[0]:
                data = edit_entry[1](data)
            zout.writestr(info.filename, data)
    return dst


def _flip_middle_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def _set(path_in_manifest, value):
    def edit(m):
        node = m
        for key in path_in_manifest[:-1]:
            node = node[key]
        node[path_in_manifest[-1]] = value

    return edit


def _bad_files(src, tmp):
    truncated = tmp / "truncated.specpass"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    corrupted = tmp / "corrupted.specpass"
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo(WEIGHTS)
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2  # inside the weights' data
    data[middle] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    zip_without_manifest = tmp / "other.zip"
    with zipfile.ZipFile(zip_without_manifest, "w") as z:
        z.writestr("hello.txt", "hi")
    text = tmp / "notes.txt"
    text.write_text("not an engine")
    compressed = tmp / "compressed.specpass"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))

    def rename_program(m):
        m["programs"]["../../evil"] = m["programs"].pop("decode")

    return {
        "compressed": (compressed, "is compressed"),
        "program_name": (_rewrite(src, tmp / "name.specpass", rename_program), "names a program '../../evil'"),
        "dtype": (
            _rewrite(src, tmp / "dtype.specpass", _set(["cache", "dtype"], "Tensor")),
            "names the dtype 'Tensor'",
        ),
        "no_vocab": (_rewrite(src, tmp / "vocab.specpass", _set(["vocab_size"], None)), "has no vocabulary size"),
        "truncated": (truncated, "truncated"),
        "corrupted": (corrupted, "damaged"),
        "checksum": (
            _rewrite(src, tmp / "checksum.specpass", edit_entry=(WEIGHTS, _flip_middle_byte)),
            "checksum mismatch for weights.safetensors",
        ),
        "newer_format": (
            _rewrite(src, tmp / "newer.specpass", _set(["format_version"], 99)),
            "newer than this specpass reads",
        ),
        "other_torch": (
            _rewrite(src, tmp / "torch.specpass", _set(["versions", "torch"], "1.13.1")),
            "compiled with torch 1.13.1",
        ),
        "orders": (
            _rewrite(src, tmp / "orders.specpass", _set(["cpu", "orders"], {"order|few_tokens|12xA": {}})),
            "has bad fp32 operand orders",
        ),
        "gpu_engine": (
            _rewrite(src, tmp / "gpu.specpass", _set(["device"], "cuda")),
            "compiled for a CUDA GPU",
        ),
        "not_an_engine": (text, "not a specpass engine"),
        "zip_without_manifest": (zip_without_manifest, "not a specpass engine"),
        "missing": (tmp / "nowhere.specpass", "no such engine file"),
    }


BAD = [
    "compressed",
    "program_name",
    "dtype",
    "no_vocab",
    "truncated",
    "corrupted",
    "checksum",
    "newer_format",
    "other_torch",
    "orders",
    "gpu_engine",
    "not_an_engine",
    "zip_without_manifest",
    "missing",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_engine_files_are_refused_clearly(compiled, tmp_path, capsys, case):
    if case == "gpu_engine" and torch.cuda.is_available():
        pytest.skip("a GPU is here: a manifest that says cuda is not an error on this machine")
    _, _, path, _ = compiled
    bad, message = _bad_files(path, tmp_path)[case]
    with pytest.raises(SpecPassError, match=message):
        load_engine(bad)
    assert main(["run", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    *notes, last = err.strip().splitlines()  # at most the note that an engine is native code, then the error
    assert last.startswith("specpass: error:") and message in last and "Traceback" not in err
    assert all(line.startswith("specpass: note: an engine file is native code") for line in notes) and len(notes) <= 1
    if case not in ("checksum", "corrupted", "other_torch", "truncated", "gpu_engine"):  # inspect reads the manifest
        with pytest.raises(SpecPassError, match=message):
            read_manifest(bad)


def test_an_interrupted_or_failed_write_leaves_nothing(compiled, tmp_path, monkeypatch):
    model, tok, path, _ = compiled
    engine = load_engine(path)
    sm = _as_spec_model(model, engine)
    real = zipfile.ZipFile.writestr
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the manifest and one payload
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_engine(sm, tmp_path / "out.specpass", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(SpecPassError, match="cannot write the engine .*out.specpass: No space left on device"):
        write_engine(sm, tmp_path / "out.specpass", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_engine(sm, tmp_path / "out.specpass", tokenizer=tok)  # the same call, uninterrupted, writes the file
    assert torch.equal(
        load_engine(tmp_path / "out.specpass").generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4),
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4),
    )


def test_compile_refuses_an_output_path_it_cannot_write_before_compiling(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    # the model does not exist either: the path is checked first, before anything is loaded
    assert main(["compile", str(tmp_path / "no-model"), "-o", str(a_file / "x.specpass")]) == 2
    assert f"-o {a_file / 'x.specpass'}: {a_file} is a file, not a folder" in capsys.readouterr().err


def test_only_aoti_programs_can_be_written(tmp_path):
    model, tok = tiny_chat_model()
    sm = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    with pytest.raises(SpecPassError, match="backend 'eager'"):
        write_engine(sm, tmp_path / "x.specpass")
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the GPU test covers TensorRT")
    model, _ = tiny_chat_model()
    with pytest.raises(SpecPassError, match="needs a CUDA GPU"):
        specpass.optimize(model, speculate=False, backend="tensorrt", max_cache_len=32, progress=False)
    assert main(["compile", "default", "-o", str(tmp_path / "x.specpass"), "--backend", "tensorrt"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_constants_off_the_program_device_are_bound_as_copies():
    """A user-managed constant is read in place by the compiled kernels: one on another device is copied there
    (a CUDA kernel given a host pointer would crash the process); one already there is bound as it is."""
    from specpass.lower.inductor import bind_on_device

    t = torch.ones(3)
    assert bind_on_device(t, torch.device("cpu"), "w") is t
    moved = bind_on_device(t, torch.device("meta"), "w")  # the one other device a CPU machine has
    assert moved is not t and moved.device.type == "meta" and moved.shape == t.shape


@pytest.mark.parametrize(
    "probe, why",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "its loader crashed the process (SIGSEGV)"),
        (inductor_lowering._PROBE, "its loader failed: "),  # the real probe, on a file that is no package
    ],
    ids=["crash", "error"],
)
def test_a_loader_that_kills_or_fails_in_a_child_is_a_clear_error_once(probe, why, tmp_path, monkeypatch):
    """On a CUDA device the package is first loaded in a child process (AOTInductor's loader killed the process
    on an H200): a crash or a failure there is a SpecPassError naming the eager backend, probed once per device."""
    monkeypatch.setattr(inductor_lowering, "_PROBE", probe)
    monkeypatch.setattr(inductor_lowering, "_probed", {})
    path = tmp_path / "p.pt2"
    path.write_bytes(b"not a package")
    device = torch.device("cuda", 0)  # never touched in this process: only named to the child
    with pytest.raises(SpecPassError, match="backend='eager'") as first:
        inductor_lowering.check_loader(str(path), device)
    assert why in str(first.value) and "cuda:0" in str(first.value)
    monkeypatch.setattr(inductor_lowering.subprocess, "run", None)  # a second check must not start a child
    with pytest.raises(SpecPassError, match=why.replace("(", r"\(").replace(")", r"\)")):
        inductor_lowering.check_loader(str(path), device)


def test_a_loader_that_works_in_a_child_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(inductor_lowering, "_PROBE", "import sys; assert sys.argv[2] == '0'")
    monkeypatch.setattr(inductor_lowering, "_probed", {})
    inductor_lowering.check_loader(str(tmp_path / "p.pt2"), torch.device("cuda", 0))
    assert inductor_lowering._probed == {"cuda:0": None}


# ---- signed engines --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed(compiled, tmp_path_factory):
    """Two key pairs from ``specpass keygen``, and the tiny model's engine compiled with ``--sign`` by the first."""
    _, _, unsigned, _ = compiled
    tmp = tmp_path_factory.mktemp("signed")
    assert main(["keygen", str(tmp / "ours")]) == 0
    assert main(["keygen", str(tmp / "theirs"), "--json"]) == 0
    assert oct((tmp / "ours").stat().st_mode & 0o777) == "0o600"
    path = tmp / "signed.specpass"
    model_dir = unsigned.parent / "model"
    plan = unsigned.parent / "plan.json"
    rc = main(
        [
            "compile",
            str(model_dir),
            "-o",
            str(path),
            "--plan",
            str(plan),
            "--max-cache-len",
            "64",
            "--sign",
            str(tmp / "ours"),
        ]
    )
    assert rc == 0
    return path, tmp / "ours.pub", tmp / "theirs.pub"


def _refused_before_any_payload(monkeypatch, argv, capsys, message):
    """``specpass run argv`` exits 2 with one clear line, having read no payload and loaded no program."""
    import specpass.engine as engine_module

    def touched(*args, **kwargs):
        raise AssertionError("a payload was read before the signature was checked")

    monkeypatch.setattr(engine_module, "_read_checked", touched)
    monkeypatch.setattr("specpass.lower.inductor.load_aoti_program", touched)
    assert main(["run", *map(str, argv), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specpass: error:") and message in err and err.strip().count("\n") == 0, err


def test_a_signed_engine_runs_under_trust_and_says_who_signed_it(signed, compiled, capsys):
    path, ours, _ = signed
    assert main(["run", str(path), "--trust", str(ours), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]) == 0
    signed_out = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["run", str(compiled[2]), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == signed_out
    engine = load_engine(path, trust=[ours])
    from specpass.signing import fingerprint, load_public_key

    assert engine.signer == fingerprint(load_public_key(ours))
    assert main(["inspect", str(path)]) == 0
    assert f"signed      by {engine.signer}" in capsys.readouterr().out


def test_a_tampered_signed_engine_is_refused(signed, tmp_path, capsys, monkeypatch):
    path, ours, _ = signed
    # a consistent forgery: a program's bytes changed and the manifest's checksum updated to match
    package = "programs/decode.pt2"
    with zipfile.ZipFile(path) as z:
        forged = _flip_middle_byte(z.read(package))
    digest = __import__("hashlib").sha256(forged).hexdigest()
    bad = _rewrite(path, tmp_path / "forged.specpass", _set(["payloads", package], digest), (package, lambda _: forged))
    _refused_before_any_payload(monkeypatch, [bad, "--trust", ours], capsys, "does not match the manifest")


def test_an_engine_signed_by_a_foreign_key_is_refused(signed, capsys, monkeypatch):
    path, _, theirs = signed
    _refused_before_any_payload(monkeypatch, [path, "--trust", theirs], capsys, "which is not a trusted key")


def test_an_unsigned_engine_is_refused_under_trust(signed, compiled, capsys, monkeypatch):
    _, ours, _ = signed
    _refused_before_any_payload(monkeypatch, [compiled[2], "--trust", ours], capsys, "is not signed")


def test_bad_keys_are_clear_errors(signed, tmp_path, capsys):
    path, ours, _ = signed
    assert main(["keygen", str(ours.with_suffix(""))]) == 2  # never overwrites a key
    assert "exists" in capsys.readouterr().err
    assert main(["run", str(path), "--trust", str(tmp_path / "none.pub"), "--prompt", "hi"]) == 2
    assert "cannot read the trusted key" in capsys.readouterr().err
    (tmp_path / "junk.pub").write_text("not a key")
    assert main(["run", str(path), "--trust", str(tmp_path / "junk.pub"), "--prompt", "hi"]) == 2
    assert "is not a public key" in capsys.readouterr().err
    assert main(["compile", "default", "-o", str(tmp_path / "x.specpass"), "--sign", str(ours)]) == 2
    assert "is not an unencrypted private key" in capsys.readouterr().err
    assert not (tmp_path / "x.specpass").exists()


# ---- engines on another CPU ------------------------------------------------------------------------------
#: an x86-64 CPU without AVX: no level but ``generic`` runs on it
_NO_AVX = frozenset({"sse", "sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16"})
#: AT&T operands only AVX-512 (EVEX) code names: zmm, the 16 upper xmm/ymm registers, mask registers, broadcasts
_AVX512_OPERAND = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]|\{1to\d+\}")


def _on_a_cpu_without_avx(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("An old x86-64 CPU", _NO_AVX))
    monkeypatch.setattr(machine, "is_x86", lambda: True)


def _avx512_instructions(engine_path, tmp_path) -> int:
    """How many instructions of the engine's compiled programs use an AVX-512 operand (objdump)."""
    count = 0
    with zipfile.ZipFile(engine_path) as z:
        packages = [z.read(info["package"]) for info in json.loads(z.read(MANIFEST))["programs"].values()]
    for i, package in enumerate(packages):
        with zipfile.ZipFile(io.BytesIO(package)) as p:
            for name in (n for n in p.namelist() if n.endswith(".so")):
                lib = tmp_path / f"{i}-{name.rsplit('/', 1)[-1]}"
                lib.write_bytes(p.read(name))
                text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
                count += sum(1 for line in text.splitlines() if _AVX512_OPERAND.search(line))
    return count


def test_an_engine_for_avx2_holds_no_avx512_instruction_and_reproduces_the_model(compiled, tmp_path):
    """``specpass compile --isa avx2`` on any CPU that runs AVX2: programs an AVX2-only CPU can run (Inductor's
    default, -march=native, puts AVX-512 into them on an AVX-512 CPU: an illegal instruction on a Zen 3)."""
    if "avx2" not in machine.kernel_isas():
        pytest.skip("this CPU cannot run AVX2 programs")
    if shutil.which("objdump") is None:
        pytest.skip("no objdump (binutils) to read the compiled programs with")
    model, tok, path, manifest = compiled
    out = tmp_path / "avx2.specpass"
    argv = ["compile", str(path.parent / "model"), "-o", str(out), "--no-speculate", "--max-cache-len", "64"]
    assert main([*argv, "--isa", "avx2"]) == 0
    assert read_manifest(out)["cpu"]["isa"] == "avx2"
    assert _avx512_instructions(out, tmp_path) == 0
    if manifest["cpu"]["isa"] == "avx512":  # the same check finds AVX-512 in this CPU's default engine
        assert _avx512_instructions(path, tmp_path) > 0
    ids = chat_ids(tok, PROMPT)
    assert torch.equal(load_engine(out).generate(ids, max_new_tokens=16, do_sample=False), _hf(model, ids, 16))


def test_an_engine_is_refused_on_a_cpu_without_its_level(compiled, monkeypatch, capsys):
    _, _, path, manifest = compiled
    level = manifest["cpu"]["isa"]
    assert level == machine.kernel_isas()[0]  # this CPU's best, by default
    _on_a_cpu_without_avx(monkeypatch)
    with pytest.raises(SpecPassError, match=r"\(An old x86-64 CPU\) lacks .*avx2") as e:
        load_engine(path)
    assert f"the x86-64 level '{level}'" in str(e.value) and "specpass compile --isa generic" in str(e.value)
    assert main(["run", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "illegal instruction" in err and "Traceback" not in err


def test_an_engine_of_format_3_is_checked_by_its_programs_vector_isa(compiled, tmp_path, monkeypatch):
    """Engines written before the level was recorded were compiled with -march=native: the vector ISA each
    package's metadata names (AOTI_CPU_ISA) is what is checked."""
    model, tok, path, _ = compiled

    def as_format_3(m):
        del m["cpu"]
        m["format_version"] = 3

    old = _rewrite(path, tmp_path / "old.specpass", as_format_3)
    ids = chat_ids(tok, PROMPT)
    assert torch.equal(load_engine(old).generate(ids, max_new_tokens=8, do_sample=False), _hf(model, ids, 8))
    _on_a_cpu_without_avx(monkeypatch)
    with pytest.raises(
        SpecPassError, match=r"compiled for the instructions of the CPU that compiled it \(-march=native.* lacks .*avx2"
    ):
        load_engine(old)


def test_an_engine_from_another_cpu_times_its_fp32_order_again_and_says_when_it_is_the_slower(
    tmp_path, monkeypatch, caplog
):
    """A compiled program keeps the fp32 operand order of the CPU that compiled it (passes/linear_operand_order.py);
    on another CPU loading times both orders for the engine's shapes and warns where the compiled one is slower."""
    from specpass.engine import _orders_here
    from specpass.kernels import choice

    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    monkeypatch.setattr(choice, "choices_path", lambda: tmp_path / "choices.json")
    monkeypatch.setattr(choice, "_memo", {})
    weights = {"a": torch.randn(1024, 512), "b": torch.randn(1024, 512), "small": torch.randn(8, 8)}
    kind = choice.order_kind((1024, 512))
    here = choice.stationary_faster([weights["a"], weights["b"]])
    assert here["linear_ms"] is not None  # 4 MiB of weights: timed

    def manifest(cpu_key, stationary):
        there = {**here, "stationary": stationary}
        return {"cpu": {"isa": "avx2", "compiled_on": "Another CPU", "cpu_key": cpu_key, "orders": {kind: there}}}

    with caplog.at_level("WARNING", logger="specpass.engine"):
        assert _orders_here(manifest("x86_64|Another CPU|avx", here["stationary"]), weights, "e.specpass") == {
            kind: here
        }
        assert not _warnings(caplog)  # the same order won there: nothing to say
        assert _orders_here(manifest("x86_64|Another CPU|avx", not here["stationary"]), weights, "e.specpass")
        (record,) = _warnings(caplog)
        assert "compiled on Another CPU" in record.getMessage() and "1024x512" in record.getMessage()
    monkeypatch.setattr(choice, "stationary_faster", lambda w: pytest.fail("the compiling CPU: nothing to time"))
    assert _orders_here(manifest(machine.cpu_key(), not here["stationary"]), weights, "e.specpass") == {}


def _warnings(caplog) -> list:
    return [r for r in caplog.records if r.levelname == "WARNING" and r.name == "specpass.engine"]
