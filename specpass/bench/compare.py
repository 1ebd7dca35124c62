"""What the benchmark checks: each method's tokens against HF eager's, with HF's own near-ties tolerated."""

from __future__ import annotations

import dataclasses
import math

import torch

NEAR_TIE = 1e-3  # HF's top-2 logits closer than this: either token is a correct greedy choice up to rounding
#: bf16 / fp16 models: HF's top-2 logits fewer than this many units in the last place (of the model's dtype, at
#: the top logit) apart also tie; bf16 rounds a logit near 4 to steps of 0.03, so a reordered sum moves it a step
NEAR_TIE_ULPS = 2


@dataclasses.dataclass
class Run:
    out: torch.Tensor
    seconds: float
    compiled: int
    tau: float | None = None


class Results:
    def __init__(self, names: list[str]):
        self.names = names
        self.setup_s: dict[str, float] = {}
        self.warm_up_s: dict[str, float] = {}
        self.repeats: list[list[dict[str, Run]]] = [[]]  # per repeat of the prompts: per prompt, method -> run
        self.skipped: dict[str, str] = {}  # method -> why its setup could not run
        self.notes: dict[str, str] = {}  # method -> its runner's note

    @property
    def runs(self) -> list[dict[str, Run]]:
        """The first repeat's runs (the report's per-prompt table and its comparison with HF eager)."""
        return self.repeats[0]

    def record(
        self,
        i: int,
        name: str,
        out: torch.Tensor,
        seconds: float,
        compiled: int,
        tau: float | None = None,
        repeat: int = 0,
    ) -> None:
        while len(self.repeats) <= repeat:
            self.repeats.append([])
        runs = self.repeats[repeat]
        while len(runs) <= i:
            runs.append({})
        runs[i][name] = Run(out.detach().cpu().reshape(1, -1), seconds, compiled, tau)

    def drop(self, name: str, why: str) -> None:
        """Removes a method that failed part way, its runs so far included; the report lists it as skipped."""
        self.names = [n for n in self.names if n != name]
        for repeat in self.repeats:
            for runs in repeat:
                runs.pop(name, None)
        for per_method in (self.setup_s, self.warm_up_s, self.notes):
            per_method.pop(name, None)
        self.skipped[name] = why


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_threshold(top: float, dtype: torch.dtype) -> float:
    """The top-2 logit gap under which HF's greedy choice counts as a near-tie: ``NEAR_TIE``, or in a
    half-precision model ``NEAR_TIE_ULPS`` units in the last place of its dtype at the top logit ``top``."""
    info = torch.finfo(dtype)
    ulp = info.eps * 2.0 ** math.floor(math.log2(max(abs(top), info.tiny)))
    return max(NEAR_TIE, NEAR_TIE_ULPS * ulp)


def _top2_gap(model, prefix: torch.Tensor) -> tuple[float, float]:
    """HF eager's margin between its two best next-token logits after ``prefix``, and the near-tie threshold."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=prefix.to(device)).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1]), near_tie_threshold(float(top[0]), logits.dtype)


def compare_outputs(model, ids: torch.Tensor, ref: torch.Tensor, out: torch.Tensor) -> dict | None:
    """None if ``out`` equals the reference; else where and how it first differs."""
    n = ids.shape[1]
    ref_ids, out_ids = ref[0].tolist(), out[0].tolist()
    at = _first_difference(ref_ids, out_ids)
    if at is None:
        return None
    d = {"position": at - n, "hf_token": None, "method_token": None, "hf_top2_gap": None, "near_tie": False}
    if at < n:
        d["reason"] = "the output does not start with the prompt"
        return d
    if at < len(ref_ids):
        d["hf_token"] = ref_ids[at]
    if at < len(out_ids):
        d["method_token"] = out_ids[at]
    if d["hf_token"] is None or d["method_token"] is None:
        d["reason"] = "stopped at a different length"
        return d
    gap, threshold = _top2_gap(model, ref[:, :at])
    d["hf_top2_gap"], d["near_tie_threshold"] = gap, threshold
    d["near_tie"] = gap < threshold
    d["reason"] = "near-tie" if d["near_tie"] else "different token"
    return d
