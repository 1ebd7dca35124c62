"""Graph passes. Each pass is one file with one function ``(gm, structure, cfg) -> PassResult``.

The order below is the only place passes are sequenced.
"""

from specpass.passes.last_token_logits import last_token_logits
from specpass.passes.manager import PassResult, clone_graph_module, run_passes

#: programs -> the passes that derive them from the captured graph, in order
PIPELINES = {
    "prefill": (last_token_logits,),
    "decode": (),
}

__all__ = ["PIPELINES", "PassResult", "clone_graph_module", "last_token_logits", "run_passes"]
