"""SpecPlan: what calibration chose, as plain JSON (adapter weights included), cached on disk per model."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from specpass import machine
from specpass.cache import cache_root, check_private, write_atomic
from specpass.errors import SpecPassError
from specpass.passes import PIPELINES, DraftConfig, with_options
from specpass.runtime.dynamic_exit import VERIFY_EXITS, draft_program_name
from specpass.runtime.generate import DraftPolicy
from specpass.tune.adapter import ExitAdapter

PLAN_VERSION = 3  # 2: context lookup fields; 3: draft trees
#: the searches that make plans (tune/calibrate.py): seconds on a first run, or minutes within a budget
SEARCHES = ("quick", "full")


@dataclasses.dataclass
class SpecPlan:
    """The drafts (context lookup; a draft program: early exit / skipped layers / pruned head, or DEL's early
    exits chosen each round; draft trees), their draft-length policy, and why they were chosen.

    ``speculate=False`` means calibration measured no draft faster than plain compiled decoding.
    """

    speculate: bool
    exit_layer: int | None = None
    skip_layers: list[int] = dataclasses.field(default_factory=list)
    skip_attention: list[int] = dataclasses.field(default_factory=list)
    skip_mlp: list[int] = dataclasses.field(default_factory=list)
    vocab_ids: list[int] | None = None
    adapter: dict | None = None  # {"hidden", "rank", "tensors": {name: {"shape", "data" (base64 fp32)}}}
    max_draft: int = 3
    threshold: float = 0.5
    adaptive: bool = True
    target_acceptance: float = 0.8
    lookup: int = 0  # tokens proposed by context n-gram lookup (0: off); see runtime/lookup.py
    lookup_max_ngram: int = 3
    lookup_min_ngram: int = 1
    tree_budget: int = 0  # draft trees of this many nodes (root included) per verify; 0: chains
    lookup_branches: int = 1  # tree mode: continuations lookup adds
    tree_template: list[list[int]] = dataclasses.field(default_factory=list)  # recycled tokens: (parent, rank)
    draft_topk: int = 1  # tree mode: EAGLE-2's k for the draft program's dynamic trees (1: a greedy chain)
    del_exits: list[int] = dataclasses.field(default_factory=list)  # DEL: candidate exit layers (chains)
    del_costs: list[float] = dataclasses.field(default_factory=list)  # DEL: a draft token's cost per exit
    model_hash: str = ""
    search: str = "full"  # what chose it: "quick" (context lookup timed on a few prompts) or "full" (specpass tune)
    reason: str = ""
    measurements: dict = dataclasses.field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- the runtime's view ---------------------------------------------------------------------------
    @property
    def drafts(self) -> bool:
        """Whether anything drafts: context lookup, recycled tokens or a draft program."""
        return bool(self.lookup) or self.has_draft or bool(self.tree_budget > 1 and self.tree_template)

    @property
    def has_draft(self) -> bool:
        """Whether there is a draft program (lookup needs none)."""
        return bool(
            self.exit_layer is not None or self.skip_layers or self.skip_attention or self.skip_mlp or self.del_exits
        )

    def program_names(self) -> list[str]:
        """The programs the plan's drafts need besides prefill and decode."""
        if self.del_exits:
            return [VERIFY_EXITS, *(draft_program_name(k) for k in self.del_exits)]
        return ["draft"] if self.has_draft else []

    @property
    def tree_draft(self) -> bool:
        """Whether the draft program grows trees: it then runs a level of several nodes per pass."""
        return self.has_draft and self.tree_budget > 0

    def draft_key(self) -> str:
        """What identifies the draft program (the policy fields do not change it)."""
        fields = (
            self.exit_layer,
            self.skip_layers,
            self.skip_attention,
            self.skip_mlp,
            self.vocab_ids,
            self.adapter,
            self.tree_draft,
            self.del_exits,
        )
        return hashlib.blake2b(json.dumps(fields).encode(), digest_size=16).hexdigest()

    def draft_config(self, device=None, dtype=None) -> DraftConfig:
        """The draft passes' configuration, the exit adapter on ``device`` in the model's ``dtype``."""
        return DraftConfig(
            skip_layers=tuple(self.skip_layers),
            skip_attention=tuple(self.skip_attention),
            skip_mlp=tuple(self.skip_mlp),
            exit_layer=self.exit_layer,
            adapter=self.exit_adapter(device, dtype),
            vocab_ids=None if self.vocab_ids is None else torch.tensor(self.vocab_ids, device=device),
        )

    def policy(self) -> DraftPolicy:
        return DraftPolicy(
            max_draft=self.max_draft,
            threshold=self.threshold,
            adaptive=self.adaptive,
            target_acceptance=self.target_acceptance,
            lookup=self.lookup,
            lookup_max_ngram=self.lookup_max_ngram,
            lookup_min_ngram=self.lookup_min_ngram,
            tree_budget=self.tree_budget,
            lookup_branches=self.lookup_branches,
            tree_template=tuple((int(p), int(r)) for p, r in self.tree_template),
            draft_topk=self.draft_topk,
            exits=tuple(int(k) for k in self.del_exits),
            exit_costs=tuple(float(c) for c in self.del_costs),
        )

    def exit_adapter(self, device=None, dtype=None) -> ExitAdapter | None:
        if self.adapter is None:
            return None
        module = ExitAdapter(self.adapter["hidden"], self.adapter["rank"])
        state = {name: _decode(t) for name, t in self.adapter["tensors"].items()}
        module.load_state_dict(state)
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def set_adapter(self, module: ExitAdapter) -> None:
        tensors = {name: _encode(t) for name, t in module.state_dict().items()}
        hidden = module.norm_weight.shape[0]
        self.adapter = {"hidden": hidden, "rank": module.rank, "tensors": tensors}

    def describe(self) -> str:
        if not self.speculate:
            return f"no speculation ({self.reason})" if self.reason else "no speculation"
        parts = []
        if self.lookup:
            parts.append(
                f"context lookup of up to {self.lookup} tokens ({self.lookup_min_ngram}..{self.lookup_max_ngram}-grams)"
            )
        if self.exit_layer is not None:
            parts.append(f"exit after layer {self.exit_layer}" + (" + adapter" if self.adapter else ""))
        if self.del_exits:
            parts.append(f"DEL: exit after layer {' / '.join(map(str, self.del_exits))}, chosen each round")
        if self.skip_layers:
            parts.append(f"skip {len(self.skip_layers)} layers")
        if self.vocab_ids is not None:
            parts.append(f"head pruned to {len(self.vocab_ids)} tokens")
        if self.tree_draft and self.draft_topk > 1:
            parts.append(f"EAGLE-2 draft trees of depth {self.max_draft} and top-{self.draft_topk}")
        elif self.has_draft:
            parts.append(f"up to {self.max_draft} draft tokens")
        if self.tree_budget:
            recycled = f", {len(self.tree_template)} recycled-token nodes" if self.tree_template else ""
            parts.append(f"trees of up to {self.tree_budget} nodes ({self.lookup_branches} lookup branches{recycled})")
        return ", ".join(parts)

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SpecPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecPassError(f"not a SpecPlan: invalid JSON ({e})") from e
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise SpecPassError(f"not a SpecPlan of version {PLAN_VERSION}; calibrate again (specpass.calibrate)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecPassError(f"SpecPlan has unknown fields {unknown}")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        write_atomic(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpecPlan:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecPassError(f"cannot read the SpecPlan {path}: {e.strerror or e}") from e
        return cls.from_json(text)

    def check(self, model: nn.Module) -> None:
        """Refuse a plan made for a different model (layer or vocabulary counts that cannot fit)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_layers, vocab = config.num_hidden_layers, model.get_output_embeddings().weight.shape[0]
        layers = [*self.skip_layers, *self.skip_attention, *self.skip_mlp]
        if self.exit_layer is not None:
            layers.append(self.exit_layer)
        layers += self.del_exits
        if any(not 0 <= i < n_layers for i in layers):
            raise SpecPassError(
                f"this SpecPlan names layers beyond the model's {n_layers}: it was made for another model"
            )
        if self.vocab_ids is not None and max(self.vocab_ids, default=0) >= vocab:
            raise SpecPassError(f"this SpecPlan's draft vocabulary exceeds the model's {vocab} tokens")
        others = self.exit_layer is not None or self.adapter or self.skip_layers or self.skip_attention or self.skip_mlp
        if self.del_exits and (others or self.tree_budget):
            raise SpecPassError(
                "a DEL plan (del_exits) drafts chains from plain early exits: leave exit_layer, adapter, skip_layers, "
                "skip_attention, skip_mlp and tree_budget unset"
            )
        if self.del_exits and (max(self.del_exits) >= n_layers - 1 or len(set(self.del_exits)) < len(self.del_exits)):
            raise SpecPassError(f"del_exits must be distinct layers in [0, {n_layers - 2}], got {self.del_exits}")
        if self.del_costs and len(self.del_costs) != len(self.del_exits):
            raise SpecPassError(f"del_costs has {len(self.del_costs)} entries for {len(self.del_exits)} del_exits")
        if isinstance(self.draft_topk, bool) or not isinstance(self.draft_topk, int) or self.draft_topk < 1:
            raise SpecPassError(f"SpecPlan.draft_topk must be an int >= 1, got {self.draft_topk!r}")
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.adapter is not None and self.adapter["hidden"] != hidden:
            raise SpecPassError(
                f"this SpecPlan's exit adapter is for hidden size {self.adapter['hidden']}, not {hidden}"
            )


def _encode(t: torch.Tensor) -> dict:
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return {"shape": list(t.shape), "data": base64.b64encode(data).decode()}


def _decode(entry: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(entry["data"]))
    return torch.frombuffer(raw, dtype=torch.float32).reshape(entry["shape"]).clone()


# --------------------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------------------
def model_hash(model: nn.Module, *, exact_lowbit: bool | str = True) -> str:
    """A hash of the model's config and every weight, plus what makes measured speeds comparable here (the
    CPU, threads, device, and the pass pipelines: a new pass, or one turned off, changes what calibration
    timed; with exact_lowbit, the kernels' ISA and build, and how their use is chosen)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    device = next(model.parameters()).device
    h.update(f"{PLAN_VERSION}|{machine.cpu_key()}|{torch.get_num_threads()}|{device.type}".encode())
    if exact_lowbit:
        from specpass.kernels import KernelBuildError, kernel_isa, library_path

        try:  # the build's name hashes its sources: a faster kernel times the plans again
            build = library_path(kernel_isa())[0].name
        except KernelBuildError:  # no compiler: the weights stay fp32
            build = "none"
        h.update(f"lowbit|{kernel_isa()}|{build}|{exact_lowbit}".encode())
    pipelines = {
        name: [p.__name__ for p in with_options(passes, exact_lowbit=exact_lowbit)]
        for name, passes in PIPELINES.items()
    }
    h.update(repr(sorted(pipelines.items())).encode())
    return h.hexdigest()


def plan_cache_dir() -> Path:
    return cache_root() / "plans"


def cached_plan(key: str) -> SpecPlan | None:
    path = plan_cache_dir() / f"{key}.json"
    if not path.exists():
        return None
    check_private(path)
    try:
        return SpecPlan.load(path)
    except SpecPassError:
        return None  # an old or damaged entry: calibrate again and overwrite it
