"""Give the draft program a pruned LM head over the most frequent tokens (FR-Spec, Zhao et al., 2025;
VocabTrim, Goel et al., 2025).

The head's ``linear(h, W[, b])`` becomes ``linear(h, W[ids][, b[ids]])`` for the N calibrated token ids, and
the program's output maps those N logits back into a full-vocabulary row filled with -inf: the runtime
and the acceptance rules keep one vocabulary, and a draft can never propose a token outside the N. The rows
are a copy (N x hidden), so the target's head and weights stay untouched.
"""

from __future__ import annotations

import torch

from specpass.errors import SpecPassError
from specpass.passes.manager import PassResult, attr_of, tag
from specpass.structure import module_path_of

_LINEAR = torch.ops.aten.linear.default


def prune_lm_head(gm: torch.fx.GraphModule, structure, cfg) -> PassResult:
    """Keep the head rows of ``cfg.vocab_ids``; map the logits back to the full vocabulary."""
    ids = cfg.vocab_ids
    if ids is None or ids.numel() == 0:
        raise SpecPassError("prune_lm_head: no token ids configured (cfg.vocab_ids is empty)")
    head_path = structure.lm_head_path
    linears = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target is _LINEAR
        and head_path in module_path_of(n)
        and n.args[1].op == "get_attr"
    ]
    if len(linears) != 1:
        raise SpecPassError(
            f"prune_lm_head: expected 1 aten.linear with a weight in '{head_path}', found {len(linears)}"
        )
    head = linears[0]
    weight = attr_of(gm, head.args[1].target)
    vocab = weight.shape[0]
    ids = ids.to(device=weight.device, dtype=torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != ids.numel():
        raise SpecPassError(f"prune_lm_head: vocab_ids must be distinct ids in [0, {vocab})")
    gm.register_buffer("specpass_draft_head_weight", weight.detach()[ids].contiguous())
    bias = head.args[2] if len(head.args) > 2 else None
    with gm.graph.inserting_before(head):
        w = gm.graph.get_attr("specpass_draft_head_weight")
        new_args = [head.args[0], w]
        if bias is not None:
            gm.register_buffer("specpass_draft_head_bias", attr_of(gm, bias.target).detach()[ids].contiguous())
            b = gm.graph.get_attr("specpass_draft_head_bias")
            b.meta["val"] = gm.specpass_draft_head_bias
            new_args.append(b)
        pruned = gm.graph.call_function(_LINEAR, tuple(new_args))
    for n in (w, pruned):
        tag(n, "prune_lm_head", head)
    w.meta["val"] = gm.specpass_draft_head_weight
    val = head.meta["val"]
    pruned.meta["val"] = val.new_empty((*val.shape[:-1], ids.numel()))
    head.replace_all_uses_with(pruned)
    gm.graph.erase_node(head)

    # The program's logits output goes back to (..., vocab): a gather from [pruned logits, -inf] where each
    # vocabulary id picks its pruned column, or the -inf one. No symbolic sizes needed, so q stays dynamic.
    inverse = torch.full((vocab,), ids.numel(), dtype=torch.long, device=ids.device)
    inverse[ids] = torch.arange(ids.numel(), device=ids.device)
    gm.register_buffer("specpass_draft_vocab_index", inverse)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0]
    if isinstance(logits, (tuple, list)) and len(logits) == 1:
        logits = logits[0]
    if not isinstance(logits, torch.fx.Node):
        raise SpecPassError(f"prune_lm_head: the program returns {len(logits)} values, expected the logits alone")
    lval = logits.meta["val"]
    with gm.graph.inserting_before(output):
        first = gm.graph.call_function(torch.ops.aten.slice.Tensor, (logits, -1, 0, 1))
        pad = gm.graph.call_function(torch.ops.aten.full_like.default, (first, float("-inf")))
        padded = gm.graph.call_function(torch.ops.aten.cat.default, ([logits, pad], -1))
        index = gm.graph.get_attr("specpass_draft_vocab_index")
        full = gm.graph.call_function(torch.ops.aten.index_select.default, (padded, -1, index))
    first.meta["val"] = lval[..., :1]
    pad.meta["val"] = lval[..., :1]
    padded.meta["val"] = lval.new_empty((*lval.shape[:-1], ids.numel() + 1))
    full.meta["val"] = lval.new_empty((*lval.shape[:-1], vocab))
    index.meta["val"] = inverse
    for n in (first, pad, padded, index, full):
        tag(n, "prune_lm_head", logits)
    output.replace_input_with(logits, full)
    return PassResult(gm, True, 1)
