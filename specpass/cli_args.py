"""Help texts the subcommands share, said once (demo, bench and compile)."""

MODEL_HELP = (
    "'default' (SmolLM2-135M-Instruct), another bundled model ('gemma-3-270m'), a local model directory, or a "
    "Hugging Face Hub id"
)

EXACT_LOWBIT_HELP = (
    "keep every weight in fp32: do not read weights that lie exactly on a quantization grid (a GGUF model's) as "
    "their blocks (the exact_lowbit pass; lossless either way)"
)
