"""Time to first token from an engine file vs from ``specpass.optimize()`` of the HF model.

Each path runs in a fresh Python process, timed from process start (imports included) to the first
generated token; both then generate 64 more tokens greedily, and the outputs are compared.

    specpass compile default -o smollm2.specpass
    python examples/engine_time_to_first_token.py smollm2.specpass --model default
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPT = "Explain what a hash table is in two sentences."

ENGINE = """
import json, sys, time
t0 = time.perf_counter()
from specpass.engine import load_engine
engine = load_engine(sys.argv[1])
ids = engine.chat_ids(sys.argv[2])
engine.generate(ids, max_new_tokens=1, do_sample=False)
ttft = time.perf_counter() - t0
out = engine.generate(ids, max_new_tokens=64, do_sample=False)
print(json.dumps({"ttft_s": ttft, "ids": out[0].tolist()}))
"""

OPTIMIZE = """
import json, sys, time
t0 = time.perf_counter()
import specpass
from specpass.engine import read_manifest
from specpass.models import load
from specpass.tokenization import chat_ids
model, tokenizer = load(sys.argv[3])
cache = read_manifest(sys.argv[1])["cache"]["max_cache_len"]
sm = specpass.optimize(model, tokenizer=tokenizer, max_cache_len=cache, progress=False)
ids = chat_ids(tokenizer, sys.argv[2])
sm.generate(ids, max_new_tokens=1, do_sample=False)
ttft = time.perf_counter() - t0
out = sm.generate(ids, max_new_tokens=64, do_sample=False)
print(json.dumps({"ttft_s": ttft, "ids": out[0].tolist()}))
"""


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"a timed process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--model", default="default", help="the model the engine was compiled from")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    engine = _run(ENGINE, args.engine, args.prompt)
    optimize = _run(OPTIMIZE, args.engine, args.prompt, args.model)
    print(f"time to first token, engine file:        {engine['ttft_s']:.1f} s")
    print(f"time to first token, optimize() + model: {optimize['ttft_s']:.1f} s")
    print(
        f"ratio: {optimize['ttft_s'] / engine['ttft_s']:.1f}x; same 64-token output: {engine['ids'] == optimize['ids']}"
    )


if __name__ == "__main__":
    main()
