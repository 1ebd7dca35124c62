"""llama.cpp in a process of its own, so that a crash inside it ends that process and not the benchmark.

llama.cpp is C code behind ctypes: a fault in it is a signal that ends whatever process it runs in, with every
method's results so far. One has been seen: on an Intel Xeon with AMX, llama.cpp built for the CPU (its default)
segfaults in ``ggml_backend_amx_mul_mat`` on the first decode of the default model's Q4_1 file
(ggml-org/llama.cpp#20824). So the bench loads ``llama_cpp.Llama`` in a spawned child and sends it one prompt at a
time over a pipe; a child that dies is a failed method (``LlamaCppDied``, with the signal), and the others go on.
The round trip costs tens of microseconds a prompt, against the second or so a 128-token generation takes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import weakref
from pathlib import Path

from specpass.errors import SpecPassError

#: greedy decoding with every penalty off, as HF's do_sample=False
GREEDY = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
#: a llama.cpp build for each x86-64 level a process can run as (cpu_level.py): ``LLAMA_CPP_LIB_PATH`` names its
#: libraries to llama-cpp-python
_LEVEL_CMAKE = {
    "avx2": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
    "generic": "-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF",
}
LEVEL_BUILD = {
    # --no-cache-dir: pip would otherwise take the wheel it built for this CPU from its cache
    level: f"CMAKE_ARGS='{args}' pip install --no-cache-dir --no-deps --no-binary llama-cpp-python "
    "--target DIR llama-cpp-python && export LLAMA_CPP_LIB_PATH=DIR/llama_cpp/lib"
    for level, args in _LEVEL_CMAKE.items()
}
NO_AMX_BUILD = (
    "CFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' CXXFLAGS=\"$CFLAGS\" "
    "pip install --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python"
)


class LlamaCppDied(SpecPassError):
    """llama.cpp's process ended while it was loading the model or generating."""


class LlamaProcess:
    """One ``llama_cpp.Llama`` on ``gguf`` in a spawned child; ``generate`` is greedy decoding of a prompt's ids.

    ``lookup_tokens`` > 0: its prompt lookup decoding (``LlamaPromptLookupDecoding``) as draft model. The child
    is stopped when this object is garbage-collected or ``close()`` is called.
    """

    def __init__(self, gguf: Path, *, n_ctx: int, threads: int, lookup_tokens: int = 0):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
        self._conn, child_end = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(child_end, str(gguf), n_ctx, threads, lookup_tokens), name="llama.cpp", daemon=True
        )
        self._process.start()
        child_end.close()  # so that the child's death is an EOF here
        self._finalizer = weakref.finalize(self, _stop, self._conn, self._process)
        #: llama-cpp-python's version, and the ISA features its llama.cpp was built with (``AVX2``, ``FMA``, ...)
        self.version, self.features = self._receive("loading the model")

    def generate(self, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
        """The new token ids, up to ``max_new_tokens``, the first eos id included."""
        try:
            self._conn.send((prompt, max_new_tokens, sorted(eos)))
        except OSError:
            raise LlamaCppDied(self._death("generating")) from None
        return self._receive("generating")

    def close(self) -> None:
        self._finalizer()

    def _receive(self, doing: str):
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise LlamaCppDied(self._death(doing)) from None
        if status == "error":
            raise RuntimeError(f"llama.cpp failed while {doing}: {value}")
        return value

    def _death(self, doing: str) -> str:
        self._process.join(timeout=10)
        code = self._process.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                code = signal.Signals(-code).name
        hint = f"; where the CPU has AMX, a build without it runs: {NO_AMX_BUILD}" if code == "SIGSEGV" else ""
        return f"llama.cpp's process died ({code}) while {doing}: a crash inside llama.cpp{hint}"


def _features(system_info: bytes) -> list[str]:
    """The instruction sets llama.cpp says it was built with: ``CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |`` ->
    [SSE3, AVX2]."""
    text = system_info.decode(errors="replace") if isinstance(system_info, bytes) else str(system_info)
    pairs = [part.rsplit(":", 1)[-1].split("=") for part in text.split("|")]
    names = [p[0].strip() for p in pairs if len(p) == 2 and p[1].strip() == "1"]
    return [n for n in names if n.startswith(("SSE", "SSSE", "AVX", "F16C", "FMA", "BMI", "AMX"))]


def wider_than(features: list[str], level: str) -> list[str]:
    """The features of a llama.cpp build that a CPU of ``level`` (avx2, generic) lacks."""
    wider = ("AVX512", "AMX", "AVX_VNNI") if level == "avx2" else ("AVX", "FMA", "F16C", "BMI2", "AMX")
    return [f for f in features if f.startswith(wider)]


def _stop(conn, process) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(None)
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _serve(conn, gguf: str, n_ctx: int, threads: int, lookup_tokens: int) -> None:
    """The child: loads the model, then answers (prompt, max new tokens, eos ids) requests until it gets None."""
    # llama.cpp writes notices to the C streams whatever ``verbose`` says; what fails here goes through the pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        import llama_cpp

        kwargs = {}
        if lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens)
            # verifying drafts reads every position's logits; without this, llama-cpp-python sizes its logits
            # array by n_batch and a draft past position 512 overflows it
            kwargs["logits_all"] = True
        llm = llama_cpp.Llama(
            model_path=gguf,
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - the parent reports it as the method's failure
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", (getattr(llama_cpp, "__version__", "?"), _features(llama_cpp.llama_print_system_info()))))
    while (request := conn.recv()) is not None:
        prompt, max_new_tokens, eos = request[0], request[1], set(request[2])
        try:
            new: list[int] = []
            # generate(reset=True) alone keeps the KV cache of the longest prefix the last prompt shares with
            # this one (no full prefill, and a prefix that overflows its logits array near n_ctx); reset()
            # forgets it all
            llm.reset()
            for token in llm.generate(prompt, reset=True, **GREEDY):
                new.append(int(token))
                if token in eos or len(new) >= max_new_tokens:
                    break
            conn.send(("ok", new))
        except Exception as e:  # noqa: BLE001 - as above
            conn.send(("error", f"{type(e).__name__}: {e}"))
