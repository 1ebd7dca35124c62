"""Greedy decoding of tiny random models of the 2026 families, plain and with forced speculation, against HF.

The architectures of issue 14 (latent attention, per-layer K/V shapes, shared K/V, chunked attention, linear
attention and state-space hybrids) on any device, e.g. a GPU that CI never has::

    python examples/architectures_check.py --device cuda --backend eager

One row per architecture: plain and speculative decoding equal to HF ``generate`` (True/False), the drafts
verification rejected (the recurrent-state rollback at work), seconds. Architectures this transformers does not
know are listed as such. Exits 1 if any row differs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

ARCHS = (
    "qwen3_5_text",
    "qwen3_next",
    "mamba2",
    "mamba",
    "jamba",
    "falcon_h1",
    "deepseek_v3",
    "gemma4_text",
    "gemma3n_text",
    "llama4_text",
    "bloom",
    "gpt_neo",
)


def check(model_type: str, device: str, backend: str, new_tokens: int) -> dict:
    from transformers import CONFIG_MAPPING

    import specpass
    from specpass.coverage import FORCED_PLAN_FIELDS
    from specpass.tiny_models import build_tiny_model
    from specpass.tune.plan import SpecPlan

    if model_type not in CONFIG_MAPPING:
        return {"arch": model_type, "status": "unknown to this transformers"}
    t0 = time.perf_counter()
    model = build_tiny_model(model_type).to(device)
    ids = torch.tensor([[5, 17, 9, 5, 17, 30, 2, 8]], device=device)
    with torch.no_grad():
        want = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
    # coverage's plan (lookup, else an early exit after layer 0), and the early exit with a draft vocabulary that
    # lacks every other token HF generates, so that verification rejects drafts too
    vocab = model.get_output_embeddings().weight.shape[0]
    missing = set(want[0, ids.shape[1] :: 2].tolist())
    rejecting = dict(FORCED_PLAN_FIELDS, lookup=0, vocab_ids=[t for t in range(vocab) if t not in missing])
    equal, rejected = [], 0
    for fields in (FORCED_PLAN_FIELDS, rejecting):
        sm = specpass.optimize(
            model, speculate=True, plan=SpecPlan(**fields), backend=backend, max_cache_len=64, progress=False
        )
        plain = sm.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], speculate=False)
        spec = sm.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
        equal += [torch.equal(plain, want), torch.equal(spec, want)]
        rejected += sum(sm.last_stats.drafted) - sum(sm.last_stats.accepted)
    return {
        "arch": model_type,
        "status": "ok",
        "plain_equal": all(equal[0::2]),
        "speculative_equal": all(equal[1::2]),
        "rejected": rejected,
        "recurrent_state": sm.spec.has_state,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="eager", choices=("eager", "inductor", "compile"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=None, help="these model types (default: all of ARCHS)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    bad = 0
    for arch in args.only or ARCHS:
        try:
            row = check(arch, args.device, args.backend, args.new_tokens)
        except Exception as e:  # noqa: BLE001 - report the row and go on
            row = {"arch": arch, "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
        bad += row["status"] != "ok" and not row["status"].startswith("unknown")
        bad += row.get("plain_equal") is False or row.get("speculative_equal") is False
        print(row, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
