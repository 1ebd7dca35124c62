"""exact_lowbit: weights that lie on a GGUF block grid are stored as their blocks, bit for bit, and read by the
low-bit kernels; everything else stays fp32. Oracles: the recovered blocks rebuild every weight bit for bit;
the kernels match F.linear / F.embedding on those weights; generation equals HF's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_speculative import _hf

import specpass
from specpass.graph_text import normalize
from specpass.kernels import choice, load_kernels
from specpass.passes import PIPELINES, run_passes
from specpass.passes.exact_lowbit import exact_lowbit, pack, recover_blocks

pytestmark = pytest.mark.compat

LOWBIT_LINEAR = torch.ops.specpass.lowbit_linear.default
LOWBIT_EMBEDDING = torch.ops.specpass.lowbit_embedding.default


# ---- weights on a grid, written as GGUF's quantizers write them (per block: fp16 scale [and min], integer codes) --
def on_grid(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` quantized to ``fmt``'s grid and dequantized as gguf-py does (float32 ops on fp16 scales)."""
    block = 16 if fmt == "Q6_K" else 32
    b = w.reshape(-1, block).double()
    if fmt in ("Q4_1", "Q5_1"):
        levels = 15 if fmt == "Q4_1" else 31
        lo = b.min(1).values.half().float()
        d = ((b.max(1).values - lo) / levels).half().float()
        q = torch.round((b - lo[:, None]) / d[:, None].clamp_min(1e-8)).clamp(0, levels).float()
        out = d[:, None] * q + lo[:, None]
    else:
        qmax = {"Q4_0": 8, "Q5_0": 16, "Q6_K": 32, "Q8_0": 127}[fmt]
        top = b.gather(1, b.abs().argmax(1, keepdim=True)).squeeze(1)
        d = (top / (qmax if fmt == "Q8_0" else -qmax)).half().float()
        lo_q, hi_q = (-127, 127) if fmt == "Q8_0" else (-qmax, qmax - 1)
        step = torch.where(d == 0, 1.0, d).double()  # an all-zero block (a padding row) has scale 0
        q = torch.round(b / step[:, None]).clamp(lo_q, hi_q).float() + 0.0  # integer codes: no -0.0
        if fmt == "Q6_K":  # K-quants: an fp32 sub-scale d * sc (sc a 6-bit int) per 16 values
            sc = torch.randint(1, 63, d.shape).float()
            d = (d.double() / sc.double()).half().float() * sc
        out = d[:, None] * q
    return out.float().reshape(w.shape)


def perturb(w: torch.Tensor, blocks: list[int], block: int = 32) -> torch.Tensor:
    """``w`` with one value in each of ``blocks`` (flat block ids) moved to the next float: off the grid."""
    w = w.clone()
    flat = w.view(-1)
    for b in blocks:
        i = b * block + 3
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf")))
    return w


def rebuilt(blocks) -> torch.Tensor:
    return torch.ops.specpass.lowbit_dequantize(*blocks.tensors(), blocks.block, blocks.bits)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def assert_matches_rebuild_exactly(model) -> dict[str, int]:
    """Every 2-D fp32 weight of ``model`` the pass would store as blocks, rebuilt from them, equals the weight bit
    for bit; returns how many matrices of each format. A copy of the first matrix's blocks with one code changed
    must rebuild differently (so the comparison can fail)."""
    from collections import Counter

    formats: Counter = Counter()
    controlled = False
    for name, p in model.named_parameters():
        blocks = pack(p) if p.dim() == 2 and p.dtype == torch.float32 else None
        if blocks is None:
            continue
        assert same_bits(rebuilt(blocks), p), f"{name} ({blocks.format}) does not rebuild bit for bit"
        formats[blocks.format] += 1
        if not controlled:
            q = blocks.q.clone()
            q.view(-1)[0] ^= 1  # one code of the first block, as a damaged block would hold
            broken = torch.ops.specpass.lowbit_dequantize(q, *blocks.tensors()[1:], blocks.block, blocks.bits)
            assert not same_bits(broken, p), "a changed code rebuilt the same weights: the check cannot fail"
            controlled = True
    return dict(formats)


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    load_kernels()
    # the kernel wherever a weight is on a grid: these graphs must not depend on which is faster on this CPU
    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "always")


@pytest.mark.parametrize(
    ("fmt", "bits", "block"),
    [("Q4_0", 4, 32), ("Q4_1", 4, 32), ("Q5_0", 8, 32), ("Q5_1", 8, 32), ("Q8_0", 8, 32), ("Q6_K", 8, 16)],
)
def test_recovers_every_block_format_bit_for_bit(fmt, bits, block):
    torch.manual_seed(0)
    w = on_grid(torch.randn(48, 128) * 0.05, fmt)
    blocks = recover_blocks(w)
    assert blocks is not None
    assert (blocks.format, blocks.bits, blocks.block) == (fmt, bits, block)
    assert blocks.exc_ids.numel() == 0
    assert same_bits(rebuilt(blocks), w)  # the contract: not one weight changes


def k_quant(w: torch.Tensor, levels: int) -> torch.Tensor:
    """``w`` on a K-quant's affine grid, as gguf-py dequantizes Q4_K / Q5_K: per 32 values an fp32 scale and
    minimum that are each an fp16 super-block factor times a 6-bit integer, ``d * q + m`` with codes 0..levels."""
    torch.manual_seed(1)
    b = w.reshape(-1, 32).double()
    sc, mc = torch.randint(1, 63, (b.shape[0],)).double(), torch.randint(1, 63, (b.shape[0],)).double()
    m = ((b.min(1).values / mc).half().double() * mc).float().double()
    d = (((b.max(1).values - m) / levels / sc).half().double() * sc).float().double()
    q = torch.round((b - m[:, None]) / d[:, None]).clamp(0, levels)
    q[:, 0], q[:, 1] = 0, levels  # codes 0 and levels occur (the blocks the pass recovers)
    return (d[:, None].float() * q.float() + m[:, None].float()).reshape(w.shape)


@pytest.mark.parametrize(("fmt", "levels"), [("Q4_K", 15), ("Q5_K", 31)])
def test_k_quant_blocks_are_named_as_k_quants(fmt, levels):
    torch.manual_seed(0)
    w = k_quant(torch.randn(48, 128) * 0.05, levels)
    blocks = recover_blocks(w)
    assert blocks is not None and blocks.format == fmt and blocks.exc_ids.numel() == 0
    assert same_bits(rebuilt(blocks), w)


def test_weights_off_the_grid_stay_fp32():
    torch.manual_seed(0)
    assert recover_blocks(torch.randn(64, 128)) is None
    assert recover_blocks(torch.randn(64, 128).half().float()) is None  # fp16 values are not a block grid


def test_signed_zero_is_kept():
    # A Q8_0 block with a negative scale dequantizes code 0 to -0.0: the rebuilt weight keeps its sign bit.
    torch.manual_seed(0)
    w = on_grid(torch.randn(4, 64), "Q8_0")
    w[0, :32] = -w[0, :32].abs()
    w[0, 5] = -0.0
    blocks = recover_blocks(w)
    assert blocks is not None and same_bits(rebuilt(blocks), w)


def test_perturbed_blocks_alone_stay_fp32():
    torch.manual_seed(0)
    w = on_grid(torch.randn(32, 128) * 0.05, "Q4_1")
    bad = [0, 17, 101]
    blocks = recover_blocks(perturb(w, bad))
    assert blocks.format == "Q4_1"
    assert blocks.exc_ids.tolist() == bad
    assert same_bits(rebuilt(blocks), perturb(w, bad))


def test_mostly_off_grid_matrix_stays_fp32():
    torch.manual_seed(0)
    w = on_grid(torch.randn(8, 128) * 0.05, "Q8_0")
    assert recover_blocks(perturb(w, list(range(0, 32, 2)) + [1, 3])) is None  # 18 of 32 blocks off the grid


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 17, 40])
def test_kernel_matches_linear_on_the_same_weights(fmt, tokens):
    torch.manual_seed(tokens)
    w = perturb(on_grid(torch.randn(200, 256) * 0.05, fmt), [2, 9], 16 if fmt == "Q6_K" else 32)
    blocks = recover_blocks(w)
    assert blocks.exc_ids.numel() == 2
    x = torch.randn(2, tokens, 256)
    got = torch.ops.specpass.lowbit_linear(x, *blocks.tensors(), blocks.block, blocks.bits)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)  # only the summation order differs


def test_embedding_kernel_gathers_exact_rows():
    torch.manual_seed(0)
    w = perturb(on_grid(torch.randn(64, 96), "Q8_0"), [4, 5])  # row 1's blocks 1 and 2 stay fp32
    blocks = recover_blocks(w)
    ids = torch.tensor([[1, 0, 63, 1]])
    got = torch.ops.specpass.lowbit_embedding(ids, *blocks.tensors(), blocks.block, blocks.bits)
    assert same_bits(got, F.embedding(ids, w))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.specpass.lowbit_embedding(torch.tensor([64]), *blocks.tensors(), blocks.block, blocks.bits)


# ---- a tiny model whose weights lie on Q4_1 / Q8_0 grids, a few values perturbed ---------------------------------
PERTURBED = {"model.layers.1.mlp.down_proj.weight": [0, 5], "lm_head.weight": [7]}


def grid_llama():
    """A tiny Llama as a GGUF file would give it: Q4_1 layers, a Q8_0 embedding and head (untied here), with
    the values of PERTURBED's blocks moved off the grid."""
    # a padding token, as the default model has: its embedding node carries padding_idx
    model = tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=96, tie_word_embeddings=False, pad_token_id=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            w = on_grid(p, "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1")
            p.copy_(perturb(w, PERTURBED.get(name, [])))
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def grid():
    model = grid_llama()
    return model, specpass.capture(model, max_cache_len=32)


def test_pass_rewrites_every_matched_matrix(grid, golden):
    model, cg = grid
    gm = run_passes(cg.gm, PIPELINES["decode"], cg.structure)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # per layer: q/k/v in one call, o, gate/up in one call, down; then the head
    assert ops.count(LOWBIT_LINEAR) == 4 * model.config.num_hidden_layers + 1
    sliced = [
        n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[0].target is LOWBIT_LINEAR
    ]
    assert len(sliced) == 5 * model.config.num_hidden_layers  # q, k, v and gate, up taken back from the stacks
    assert ops.count(LOWBIT_EMBEDDING) == 1
    assert torch.ops.aten.linear.default not in ops and torch.ops.aten.mm.default not in ops
    report = gm.meta["specpass"]["exact_lowbit"]
    params = dict(model.named_parameters())
    assert {info["format"] for info in report.values()} == {"Q4_1", "Q8_0"}
    for name, info in report.items():
        blocks = recover_blocks(params[name])
        assert info["fp32_blocks"] == len(PERTURBED.get(name, []))
        assert blocks.exc_ids.tolist() == PERTURBED.get(name, [])  # exactly the perturbed blocks stay fp32
        assert same_bits(rebuilt(blocks), params[name])  # the pass never changes a weight
    golden("exact_lowbit/decode-grid_llama", normalize(gm))


@pytest.mark.parametrize("program", [p for p in PIPELINES if p != "decode"])  # decode: the test above
def test_pass_rewrites_every_program_of_the_grid_model(grid, golden, program):
    from test_goldens import golden_draft_config

    model, cg = grid
    gm = run_passes(cg.gm, PIPELINES[program], cg.structure, golden_draft_config(model.config.vocab_size))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert LOWBIT_LINEAR in ops and LOWBIT_EMBEDDING in ops
    assert torch.ops.aten.embedding.default not in ops
    # every linear layer reads blocks, but DEL's exit head: its rows of the head, gathered in the graph, stay fp32
    fp32 = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert all(w.target is torch.ops.aten.index_select.default for w in fp32)
    assert len(fp32) == (1 if program == "verify_exits" else 0)
    golden(f"exact_lowbit/{program}-grid_llama", normalize(gm))


def test_pass_output_matches_eager(grid):
    model, cg = grid
    from specpass.program_export import example_inputs

    args = example_inputs(cg.spec, q=3)
    before = run_passes(cg.gm, PIPELINES["decode"][:1], cg.structure)(*[a.clone() for a in args])
    after = run_passes(cg.gm, PIPELINES["decode"], cg.structure)(*[a.clone() for a in args])
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["random fp32", "grid in bf16"])
def test_pass_leaves_other_weights_alone(model):
    # random fp32 weights lie on no grid; a bf16 model is left alone (its linear layers are not fp32)
    model = tiny_llama().requires_grad_(False) if model == "random fp32" else grid_llama().to(torch.bfloat16)
    cg = specpass.capture(model, max_cache_len=32)
    gm = run_passes(cg.gm, PIPELINES["decode"], cg.structure)
    assert LOWBIT_LINEAR not in [n.target for n in gm.graph.nodes]
    history = {h["pass"]: h for h in gm.meta["specpass"]["history"]}
    assert history["exact_lowbit"] == {"pass": "exact_lowbit", "modified": False, "n_matches": 0}


def test_a_weight_edited_in_place_is_packed_again_and_nothing_stays_on_the_weights():
    model = grid_llama()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    first = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    before = first.generate(ids, max_new_tokens=10, eos_token_id=[])
    # nothing of the packing hangs on the user's parameters (it is the compile's, freed with it)
    assert not [n for n, p in model.named_parameters() if any(a.startswith("_specpass") for a in vars(p))]
    w = model.model.layers[0].mlp.down_proj.weight
    version = w._version
    w.data.copy_(w.data.flip(0))  # rows swapped: still on the grid; through .data, the version does not move
    assert w._version == version
    want = _hf(model, ids, 10)
    assert not torch.equal(want, before), "the edit must change the output for this test to mean anything"
    again = specpass.optimize(model, speculate=False, backend="eager", max_cache_len=32, progress=False)
    assert torch.equal(again.generate(ids, max_new_tokens=10, eos_token_id=[]), want)


def test_weight_names_that_collide_as_parameter_names_keep_their_own_blocks():
    # "a.b_c" and "a_b.c" would both become the parameter name "specpass_lowbit_a_b_c_weight_..."
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleDict({"b_c": torch.nn.Linear(64, 32, bias=False)})
            self.a_b = torch.nn.ModuleDict({"c": torch.nn.Linear(64, 32, bias=False)})

        def forward(self, x, y):
            return self.a["b_c"](x) + self.a_b["c"](y)

    torch.manual_seed(0)
    model = Two().eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(on_grid(torch.randn_like(p) * 0.05, "Q4_1"))
    x, y = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    gm = torch.export.export(model, (x, y)).module()
    with choice.use_mode("always"):
        result = exact_lowbit(gm)
    assert result.n_matches == 2
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.target is LOWBIT_LINEAR]
    assert len({n.args[1].target for n in calls}) == 2  # two matrices, two sets of blocks
    torch.testing.assert_close(gm(x, y), model(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "inductor", "compile"])
def test_generate_equals_hf(grid, backend):
    model, _ = grid
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    ref = _hf(model, ids, 12)
    sm = specpass.optimize(model, speculate=False, backend=backend, max_cache_len=32, progress=False)
    assert set(sm.lowbit) >= set(PERTURBED)
    assert torch.equal(sm.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None), ref)
    off = specpass.optimize(
        model, speculate=False, backend="eager", max_cache_len=32, progress=False, exact_lowbit=False
    )
    assert off.lowbit == {} and "exact_lowbit" not in str(off.summaries["decode"].get("passes"))
    assert torch.equal(off.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None), ref)


def test_engine_stores_blocks_not_fp32(grid, tmp_path, capsys):
    from specpass.cli import main
    from specpass.engine import load_engine, write_engine

    model, _ = grid
    sm = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=32, progress=False)
    path = tmp_path / "grid.specpass"
    manifest = write_engine(sm, path)
    fp32 = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 2)
    packed = sum(info["bytes"] for info in manifest["lowbit"].values())
    assert manifest["weight_bytes"] < fp32 / 2  # the blocks, not the fp32 matrices
    assert manifest["weight_bytes"] < packed + 4096  # + the norms
    engine = load_engine(path)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(engine.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None), _hf(model, ids, 8))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q4_1  model.layers.*.mlp.down_proj.weight (2 matrices)" in out
    assert "Q4_1  model.layers.*.mlp.down_proj.weight (2 matrices): 0.0 MB, 2 of 512 blocks kept in fp32" in out
    assert "Q8_0  model.embed_tokens.weight" in out


def test_an_engine_rebuilds_the_fp32_weights_of_a_prefill_that_multiplies_in_fp32(grid, tmp_path, monkeypatch, capsys):
    """Where prefill chose fp32 and decode the kernel (the default model on a 2-core Xeon), the fp32 matrices are
    not stored: the decode program's blocks rebuild them at load, bit for bit, or the engine is refused."""
    from test_engine import _rewrite

    from specpass.cli import main
    from specpass.engine import load_engine, write_engine

    def prefill_in_fp32(calls, regime):
        return {"kind": choice.kind(calls, regime), "lowbit_ms": 1.0, "fp32_ms": 2.0, "lowbit": regime != "prefill"}

    model, _ = grid
    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    monkeypatch.setattr(choice, "lowbit_faster", prefill_in_fp32)
    sm = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=32, progress=False)
    monkeypatch.undo()
    path = tmp_path / "grid.specpass"
    manifest = write_engine(sm, path)
    linear = [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    assert len(manifest["rebuilt"]) == len(linear)  # every fp32 matrix of the prefill program
    fp32 = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 2)
    assert manifest["weight_bytes"] < fp32 / 2
    engine = load_engine(path)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(engine.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None), _hf(model, ids, 8))
    assert main(["inspect", str(path)]) == 0
    assert f"{len(linear)} fp32 matrices not stored: rebuilt from their blocks at load" in capsys.readouterr().out

    def wrong_weight(m):
        m["rebuilt"][sorted(m["rebuilt"])[0]]["sha256"] = "0" * 64

    _rewrite(path, tmp_path / "wrong.specpass", edit_manifest=wrong_weight)
    with pytest.raises(specpass.SpecPassError, match="rebuilt from its blocks differs from the one compiled"):
        load_engine(tmp_path / "wrong.specpass")
    _rewrite(path, tmp_path / "bad.specpass", edit_manifest=lambda m: m["rebuilt"].update(x={"rows": [1, 0]}))
    with pytest.raises(specpass.SpecPassError, match="says badly how to rebuild the weight 'x'"):
        load_engine(tmp_path / "bad.specpass")
