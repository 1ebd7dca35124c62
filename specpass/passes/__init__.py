"""Graph passes. Each pass is one file with one function ``(gm, structure, cfg) -> PassResult``.

The order below is the only place passes are sequenced.
"""

from specpass.passes.fold_gqa_heads import fold_gqa_heads
from specpass.passes.last_token_logits import last_token_logits
from specpass.passes.manager import PassResult, clone_graph_module, run_passes

#: programs -> the passes that derive them from the captured graph, in order
PIPELINES = {
    "prefill": (fold_gqa_heads, last_token_logits),
    "decode": (fold_gqa_heads,),
}

__all__ = ["PIPELINES", "PassResult", "clone_graph_module", "fold_gqa_heads", "last_token_logits", "run_passes"]
