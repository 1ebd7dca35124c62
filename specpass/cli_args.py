"""What the subcommands' model argument takes, said once (demo, bench and compile share it)."""

MODEL_HELP = (
    "'default' (SmolLM2-135M-Instruct), another bundled model ('gemma-3-270m'), a local model directory, or a "
    "Hugging Face Hub id"
)
