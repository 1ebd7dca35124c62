"""Shared test fixtures: tiny captured models and graph goldens.

Goldens live in ``tests/goldens/<folder>/<name>.txt`` (folder = ``capture`` or a pass name) and hold
``specpass.graph_text.normalize`` output. They change only when a run is given ``--update-goldens``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path

import pytest
import torch

GOLDENS = Path(__file__).parent / "goldens"
#: diff lines shown on a golden mismatch
MAX_DIFF_LINES = 80
#: the cache length every tiny capture uses
MAX_CACHE_LEN = 32
#: tiny architectures, cheap enough to capture in about a second each
ARCHS = ("llama", "gpt2", "qwen2")

# torch.export logs each traced graph to "torch.__trace" at DEBUG; pytest would print pages of it under every
# failure. TORCH_TRACE attaches its own handler, so it does not need the propagation.
logging.getLogger("torch.__trace").propagate = False


def pytest_configure(config):
    # The README's test command runs two pytest-xdist workers: each gets its share of the cores, since two workers
    # of two OpenMP threads each on 2 cores would spin against each other. Children (the compile worker, the
    # coverage pool) inherit the share through OMP_NUM_THREADS.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    # In the xdist controller: hand out the test files in collection order (SLOWEST_FIRST), not by test count.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


#: test files by their time in CI on two workers, slowest first (the README's test command, 2026-12-06: 230-630 s
#: each, then 80-170 s). xdist gives each worker one file at a time, and by default the files with the most tests
#: first: these few-test files came last, and the worker that drew the default model's e2e file ran 4 minutes
#: after the other had finished. Started first, they overlap the many short files instead.
SLOWEST_FIRST = (
    "test_default_model_e2e.py",
    "test_speculative.py",
    "test_gemma.py",
    "test_coverage_report.py",
    "test_program_cache.py",
    "test_dtypes.py",
    "test_tree.py",
    "test_exact_lowbit.py",
    "test_recurrent.py",
    "test_engine.py",
    "test_generate.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within a file


@pytest.fixture(autouse=True)
def _threads_kept():
    """A test that sets torch's threads (the bench and demo CLIs do) leaves the next test the count it found."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/goldens/*.txt from the current graphs instead of comparing against them",
    )


_updated: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if _updated:
        terminalreporter.write_sep("=", f"{len(_updated)} golden file(s) written")
        for name in _updated:
            terminalreporter.write_line(name)


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare text with ``tests/goldens/<name>.txt`` (or write it with --update-goldens)."""
    update = request.config.getoption("--update-goldens")

    def check(name: str, text: str) -> None:
        path = GOLDENS / f"{name}.txt"
        rel = path.relative_to(Path(__file__).parent.parent).as_posix()
        if update:
            if not path.exists() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                _updated.append(rel)
            return
        rerun = f"rerun with `python -m pytest {request.node.nodeid} --update-goldens` if the change is intended"
        if not path.exists():
            pytest.fail(f"golden {rel} does not exist; {rerun}", pytrace=False)
        expected = path.read_text()
        if expected == text:
            return
        diff = list(
            difflib.unified_diff(
                expected.splitlines(), text.splitlines(), fromfile=f"{rel} (golden)", tofile="actual", lineterm="", n=2
            )
        )
        shown = diff[:MAX_DIFF_LINES]
        if len(diff) > MAX_DIFF_LINES:
            shown.append(f"... {len(diff) - MAX_DIFF_LINES} more diff lines")
        pytest.fail(f"graph text differs from golden {rel}:\n" + "\n".join(shown) + f"\n\n{rerun}", pytrace=False)

    return check


# --------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tiny:
    arch: str
    model: torch.nn.Module
    cg: object  # specpass.CapturedGraph

    @property
    def vocab(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


#: the shape of the tests' tiny decoders: 2 layers, grouped-query attention (4 query heads on 2 KV heads)
TINY_DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(**overrides) -> torch.nn.Module:
    """A random Llama of TINY_DECODER's shape (seed 0), with ``overrides`` applied to its config."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_DECODER, **overrides}))


def sampling_model() -> torch.nn.Module:
    """An 8-token tiny Llama with spread-out next-token distributions, for chi-square tests of sampling."""
    import transformers as tf

    model = tiny_llama(vocab_size=8, max_position_embeddings=2048).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.3)
    model.generation_config = tf.GenerationConfig()
    return model


def sample_three(sm, ids: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """``sm.generate`` of 3 sampled tokens with ``cfg``'s warpers and no eos: prompt + 3 ids."""
    return sm.generate(
        ids,
        max_new_tokens=3,
        do_sample=True,
        generator=generator,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=[],
    )


def build_tiny(arch: str) -> torch.nn.Module:
    """A 2-layer random model of ``arch`` (fixed seed; only shapes matter for graphs)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        model = tiny_llama()
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY_DECODER))
    elif arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(f"no tiny config for {arch}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def tiny():
    """``tiny(arch) -> Tiny``: a tiny model and its capture (max_cache_len=32), built once per session.

    Tests must not mutate ``tiny(arch).cg.gm``; passes run on copies (``run_passes``).
    """
    import specpass

    made: dict[str, Tiny] = {}

    def get(arch: str) -> Tiny:
        if arch not in made:
            model = build_tiny(arch)
            made[arch] = Tiny(arch, model, specpass.capture(model, max_cache_len=MAX_CACHE_LEN))
        return made[arch]

    return get


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of sampled ``counts`` to ``probs``; a count where probs is 0 fails at once."""
    from scipy import stats

    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    if int(keep.sum()) == 1:
        return 1.0  # one possible token, and every sample was it (asserted above)
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()  # exact totals for scipy
    return stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


def sampled_counts(sample, n: int, size: int) -> torch.Tensor:
    """Counts over ``size`` outcomes of ``n`` calls of ``sample()`` (an outcome's index)."""
    counts = torch.zeros(size)
    for _ in range(n):
        counts[sample()] += 1
    return counts


#: a negative control stops sampling once its fit is rejected this surely, far below the 1e-3 it must reach, so
#: that its three early looks add at most 3e-6 to the chance that a correct rule is rejected by luck
EARLY_REJECT = 1e-6


def negative_control_pvalue(sample, n: int, probs: torch.Tensor) -> float:
    """The chi-square p-value against ``probs`` of ``n`` outcomes of ``sample()`` (an index into ``probs``), for a
    negative control: looked at after each quarter of the samples, it stops at the first look that rejects the fit
    at EARLY_REJECT (most broken rules are that far off within a quarter), or at once on an outcome of probability 0
    (p = 0: as sure as a rejection gets); the last look is the same test of all ``n`` samples as before."""
    counts = torch.zeros(probs.shape[0])
    for i in range(1, n + 1):
        outcome = sample()
        if probs[outcome] == 0:
            return 0.0
        counts[outcome] += 1
        if i % (n // 4) == 0 and i < n:
            p = chi2_pvalue(counts, probs)
            if p < EARLY_REJECT:
                return p
    return chi2_pvalue(counts, probs)


@pytest.fixture(autouse=True, scope="session")
def _session_plan_cache(tmp_path_factory):
    """SpecPlans calibrated by tests go to a session directory, never the user's cache (and none leak in)."""
    from specpass.tune import plan

    plans = tmp_path_factory.mktemp("plans")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "plan_cache_dir", lambda: plans)
        yield plans


@pytest.fixture(autouse=True, scope="session")
def _session_tune_ledgers(tmp_path_factory):
    """Measurements of resumable calibration searches, likewise."""
    from specpass.tune import timing

    ledgers = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timing, "ledger_path", lambda key: ledgers / f"{key}.json")
        yield ledgers


@pytest.fixture(autouse=True, scope="session")
def _session_program_cache(tmp_path_factory):
    """Compiled programs go to a session directory too: within the session, tests that compile the same graph
    share one compile (as processes of one user do), across xdist workers too; none come from an earlier run."""
    from specpass.lower import program_cache

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # this run's folder, shared by its workers (entries are written atomically)
    programs = root / "programs"
    programs.mkdir(mode=0o700, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(program_cache, "program_dir", lambda: programs)
        yield programs
