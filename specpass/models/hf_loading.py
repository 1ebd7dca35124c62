"""transformers' ``from_pretrained`` as specpass calls it: errors as ``SpecPassError``, a pad token set, and its
progress bars only where specpass draws bars."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from specpass.errors import SpecPassError
from specpass.progress import style


def load_pretrained(
    source: str, *, dtype: torch.dtype, advice: str, with_tokenizer: bool = True
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase | None]:
    """`from_pretrained` model and tokenizer, ready for inference, errors as SpecPassError."""
    # transformers reports missing files, unreachable hosts and unsupported architectures
    # through many exception types (OSError, ValueError, ImportError, ...), so any failure is
    # re-raised as SpecPassError with the original chained.
    try:
        with _hub_warnings_hidden():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:
        why = first_line(e).rstrip(".")
        raise SpecPassError(f"could not load {source!r} as a causal language model: {why}. {advice}") from e
    if not with_tokenizer:
        return model.eval(), None
    try:
        with _hub_warnings_hidden():
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        why = first_line(e).rstrip(".")
        raise SpecPassError(f"could not load the tokenizer of {source!r}: {why}. {advice}") from e
    ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _hub_warnings_hidden() -> Iterator[None]:
    """huggingface_hub's warnings off (unless specpass logs at debug level): without a network it warns about
    every request it retries, twice (its own handler and the root's), before the error that specpass reports
    as a SpecPassError anyway."""
    hub = logging.getLogger("huggingface_hub")
    if logging.getLogger("specpass").isEnabledFor(logging.DEBUG):
        yield
        return
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def ensure_pad_token(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Fall back to eos for padding, so that batched generation needs no extra arguments."""
    config = model.generation_config
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
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


def first_line(error: BaseException, limit: int = 300) -> str:
    """The head of an error message; transformers' can list hundreds of model classes."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
