"""How long ``specpass.optimize(model)`` takes in a fresh process, with and without the compiled programs cached.

Runs ``optimize()`` of a bundled model in ``--runs`` fresh processes one after the other (the first may
compile, later ones load the plan and programs from the cache) and prints each one's time and whether its
greedy output on a Spec-Bench prompt equals the first one's and HF eager's.

    python examples/second_process.py [--model default] [--runs 2] [--clear-programs]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, specpass
from specpass import models
from specpass.bench import load_questions, resolve_prompts

model, tokenizer = models.load(sys.argv[1])
ids = models.chat_ids(tokenizer, load_questions(resolve_prompts(None))[0]["turns"][0])
t0 = time.perf_counter()
sm = specpass.optimize(model, tokenizer=tokenizer, progress=False)
seconds = time.perf_counter() - t0
out = sm.generate(ids, max_new_tokens=64)[0, ids.shape[1]:].tolist()
with torch.no_grad():
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
print(json.dumps({"optimize_s": seconds, "tokens": out, "hf_equal": out == ref[0, ids.shape[1]:].tolist(),
                  "plan": sm.plan.describe() if sm.plan is not None else None}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--clear-programs", action="store_true", help="clear the program cache first")
    args = parser.parse_args()
    if args.clear_programs:
        subprocess.run([sys.executable, "-m", "specpass", "cache", "clear", "--only", "programs"], check=True)
    first = None
    for run in range(1, args.runs + 1):
        done = subprocess.run([sys.executable, "-c", CHILD, args.model], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        first = first or result
        same = result["tokens"] == first["tokens"]
        print(
            f"process {run}: optimize() {result['optimize_s']:.1f} s; output equal to process 1's: {same}, "
            f"to HF eager's: {result['hf_equal']}; plan: {result['plan']}"
        )
        if not (same and result["hf_equal"]):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
