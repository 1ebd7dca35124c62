"""Engine files: a compiled SpecModel on disk, loadable without the HF model or transformers' modeling code.

An engine is a zip archive (stored, not compressed) of:

- ``manifest.json``: format and version, the torch / transformers / specpass versions that built it, the
  model's config and generation config, the KV-cache layout, the plan, per program its package, constant
  bindings and graph summary (signature, op counts, pass history), and the sha256 of every other entry;
- ``weights.safetensors``: every constant the programs bind, stored once: programs share the model's
  weights (AOTInductor would otherwise copy them into each program's library) and tied weights are one
  tensor. An fp32 weight that another program reads as low-bit blocks (a prefill program where fp32 multiplied
  faster, beside a decode program on the kernel) is not stored: the manifest's ``rebuilt`` names the blocks and
  rows it is rebuilt from at load, bit for bit (its sha256 checked), 4-8x fewer bytes;
- ``programs/<name>.pt2``: one AOTInductor package per program (prefill, decode/verify, draft), compiled
  without their constants;
- ``recycled.safetensors``: Token Recycling's adjacency table as it was when the engine was written (warmed by
  calibration and any generation before), so that a loaded engine drafts trees from a warm table;
- ``tokenizer/``: the tokenizer's files, read back with the ``tokenizers`` library.

Writing goes to a temporary file in the destination's directory and is renamed into place, so an
interrupted compile leaves no partial engine. Loading checks the manifest and every checksum before any
payload is used.

Writing and reading stay in one module (over 500 lines) on purpose: together they are the definition of the
file format, and a field written on one side and checked on the other is seen in one place.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import types
import weakref
import zipfile
from pathlib import Path

import torch

from specpass import machine, signing
from specpass.cache_spec import CacheSpec, CacheTensor
from specpass.errors import SpecPassError
from specpass.hugepages import backed
from specpass.lower import cpu_target
from specpass.runtime.model import CompiledLM

log = logging.getLogger("specpass.engine")

FORMAT = "specpass-engine"
#: 2: the cache as a list of tensors (per-layer K/V shapes); 3: fp32 weights rebuilt from blocks; 4: the x86-64 level
#: of the CPU programs (``cpu``). Older ones are read.
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
RECYCLED = "recycled.safetensors"
_CHUNK = 1 << 20


# ---- writing ---------------------------------------------------------------------------------------------
def write_engine(sm, path: str | os.PathLike[str], *, tokenizer=None, sign_key=None) -> dict:
    """Write ``sm`` (a SpecModel lowered with the ``inductor`` backend) to ``path``; returns the manifest.

    ``sign_key``: an Ed25519 private key (or the path of one) that signs the manifest (specpass/signing.py).
    """
    from safetensors.torch import save

    from specpass.lower.inductor import AOTIProgram
    from specpass.version import __version__

    path = Path(path)
    if sm.spec.has_state:
        raise SpecPassError(
            "engine files of models with recurrent state (linear attention, state-space layers) are not supported "
            "yet: their programs are built per number of tokens when first needed; use specpass.optimize(model)"
        )
    not_aoti = [name for name, p in sm.programs.items() if not isinstance(p, AOTIProgram)]
    if not_aoti:
        raise SpecPassError(
            f"an engine holds AOTInductor programs; {', '.join(not_aoti)} were lowered with backend "
            f"{sm.backend!r}: optimize with backend='inductor' (specpass compile --backend aoti)"
        )
    stored: dict[str, torch.Tensor] = {}
    by_view: dict[tuple, str] = {}  # the same tensor (or a tied one) is stored once
    programs = {}

    def store(name: str, fqn: str, t: torch.Tensor) -> str:
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        key = by_view.get(view)
        if key is None:
            key = fqn if fqn not in stored else f"{name}/{fqn}"  # a same-named but different constant
            stored[key] = t
            by_view[view] = key
        return key

    for name, program in sm.programs.items():
        bindings = {}
        for fqn, t in program.constants.items():
            if not t.is_contiguous():  # stored contiguous, it would come back with other strides than compiled
                raise SpecPassError(f"program {name!r}: constant {fqn} is not contiguous; an engine cannot hold it")
            bindings[fqn] = store(name, fqn, t)
        # low-bit parts the package holds inside itself (AOTInductor folds small ones in): loading checks the
        # kernel against fp32 and needs every part to rebuild the weights
        lowbit_parts = {
            p: store(name, f"lowbit/{p}", sm.lowbit_params[p])
            for call in getattr(sm, "lowbit_calls", {}).get(name, [])
            for p in call["params"]
            if p not in bindings and sm.lowbit_params[p].numel()
        }
        programs[name] = {
            "package": f"programs/{name}.pt2",
            "constants": bindings,
            "summary": sm.summaries.get(name, {}),
            # what loading checks against fp32 on the CPU it runs on (kernels/choice.py)
            "lowbit_calls": getattr(sm, "lowbit_calls", {}).get(name, []),
            "lowbit_parts": lowbit_parts,
        }
    rebuilt = _rebuildable(sm, stored, store)
    for key in rebuilt:
        del stored[key]
    # safetensors refuses tensors that share memory; distinct views of one storage become copies.
    seen_storage: dict[int, str] = {}
    for key, t in list(stored.items()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            stored[key] = t.clone()
        else:
            seen_storage[ptr] = key
    payloads = {WEIGHTS: save({k: t.detach().contiguous().cpu() for k, t in stored.items()})}
    if sm.recycled.next:
        payloads[RECYCLED] = save(sm.recycled.state_dict())
    for name, program in sm.programs.items():
        payloads[programs[name]["package"]] = program.package
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(prefix="specpass-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                payloads[f"tokenizer/{f.name}"] = f.read_bytes()

    import transformers

    generation_config = sm.generation_config.to_dict() if sm.generation_config is not None else {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "specpass": __version__},
        "backend": "aoti",
        # where the packages run: a CUDA package holds GPU kernels (absent: an engine written before, CPU)
        "device": sm.cache.device.type,
        # the instructions CPU programs hold (lower/cpu_target.py): loading refuses a CPU without them
        "cpu": _cpu_of(sm),
        "model": {
            "class": type(sm.model).__name__,
            "name_or_path": getattr(sm.model.config, "_name_or_path", ""),
            "config": json.loads(sm.model.config.to_json_string()),
        },
        "generation_config": json.loads(json.dumps(generation_config, default=str)),
        "vocab_size": sm.vocab_size,
        "cache": _spec_to_json(sm.spec),
        "plan": json.loads(sm.plan.to_json()) if sm.plan is not None else None,
        "programs": programs,
        # the verify graph that passes/tree_verify.py proved can take a draft tree (None: no tree was checked)
        "tree_verify": sm.summaries.get("verify"),
        "recycled_tokens": len(sm.recycled.next),
        # weights the programs read as quantization blocks (passes/exact_lowbit.py): name -> format, blocks, bytes
        "lowbit": getattr(sm, "lowbit", {}),
        # fp32 weights not stored: key -> the blocks' parts, their rows, block, bits and the weight's sha256
        "rebuilt": rebuilt,
        # where the kernel was timed against fp32 when the engine was built (loading times it again on its CPU)
        "lowbit_build": _lowbit_build(sm),
        "weight_bytes": sum(t.numel() * t.element_size() for t in stored.values()),
        "payloads": {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()},
    }
    raw_manifest = json.dumps(manifest, indent=1).encode()
    signature = None
    if sign_key is not None:
        if isinstance(sign_key, str | os.PathLike):
            sign_key = signing.load_private_key(sign_key)
        signature = signing.sign(raw_manifest, sign_key)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, raw_manifest)
            if signature is not None:
                z.writestr(signing.SIGNATURE, signature)
            for name, data in payloads.items():
                z.writestr(name, data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a folder that went away: what to fix, not a traceback
            raise SpecPassError(f"cannot write the engine {path}: {e.strerror or e}") from e
        raise
    log.info("wrote engine %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return manifest


def _rebuildable(sm, stored: dict[str, torch.Tensor], store) -> dict[str, dict]:
    """The stored fp32 weights that some program's low-bit blocks rebuild bit for bit: key -> how (the parts'
    keys, the rows of the rebuilt matrix, block, bits, sha256). Found by comparing bits, not names: a call's
    blocks stack q/k/v or gate/up by rows, and its rows are compared with every stored weight of their shape."""
    calls = {}  # the parts' keys -> (the call, its blocks): each set of blocks once, whichever programs read it
    for name, records in getattr(sm, "lowbit_calls", {}).items():
        for call in records:
            blocks = [sm.lowbit_params[p] for p in call["params"]]
            if blocks[0].device.type == "cpu":
                parts = tuple(store(name, f"lowbit/{p}", t) for p, t in zip(call["params"], blocks, strict=True))
                calls.setdefault(parts, (call, blocks))
    part_keys = {key for parts in calls for key in parts}  # a scale matrix is 2-D fp32 too, and must stay
    by_shape: dict[tuple, list[str]] = {}
    for key, t in stored.items():
        if key not in part_keys and t.dtype == torch.float32 and t.dim() == 2 and t.device.type == "cpu":
            by_shape.setdefault(tuple(t.shape), []).append(key)
    rebuilt: dict[str, dict] = {}
    for parts, (call, blocks) in calls.items():
        if not any(tuple(shape) in by_shape for shape in call["shapes"]):
            continue  # no stored fp32 weight of its shapes: nothing to rebuild, no matrix to dequantize
        full = torch.ops.specpass.lowbit_dequantize(*blocks, call["block"], call["bits"])
        row = 0
        for n, k in call["shapes"]:
            member, rows = full[row : row + n], [row, row + n]
            row += n
            for key in by_shape.get((n, k), []):
                if key not in rebuilt and torch.equal(stored[key].view(torch.int32), member.view(torch.int32)):
                    how = {"parts": list(parts), "rows": rows, "block": call["block"], "bits": call["bits"]}
                    rebuilt[key] = {**how, "sha256": _sha256(member)}
                    break
    return rebuilt


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def _cpu_of(sm) -> dict | None:
    """The x86-64 level the CPU programs were compiled for, the CPU that compiled them and the fp32 operand orders
    timed there (passes/linear_operand_order.py); None on a GPU."""
    from specpass.kernels.choice import timed_orders

    if sm.cache.device.type != "cpu":
        return None
    orders = timed_orders(getattr(sm, "order_choices", {}))
    return {"isa": sm.isa, "compiled_on": machine.cpu_model(), "cpu_key": machine.cpu_key(), "orders": orders}


def _lowbit_build(sm) -> dict | None:
    if not getattr(sm, "lowbit", None):
        return None
    from specpass.kernels import loaded_isa

    return {"cpu": machine.cpu_model(), "isa": loaded_isa(), "choices": sm.lowbit_choices}


def _spec_to_json(spec: CacheSpec) -> dict:
    return {
        "num_layers": spec.num_layers,
        "max_cache_len": spec.max_cache_len,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "mask_kinds": list(spec.mask_kinds),
        "sliding_window": spec.sliding_window,
        "chunk_size": spec.chunk_size,
        "tensors": [
            {"layer": t.layer, "kind": t.kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            | ({"index": t.index} if t.index else {})
            for t in spec.tensors
        ],
    }


#: the dtypes a manifest may name (read by name, never through getattr on torch)
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
#: a program's name becomes a file name when it is loaded: letters, digits and underscores only
_PROGRAM_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def _dtype(name) -> torch.dtype:
    if name not in _DTYPES:
        raise _Malformed(f"names the dtype {name!r}, not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class _Malformed(ValueError):
    """A manifest field that is not what specpass writes (raised as a SpecPassError naming the engine)."""


def _spec_from_json(data: dict) -> CacheSpec:
    dtype = _dtype(data["dtype"])
    if "tensors" not in data:  # format 1: one K/V shape for every layer
        return CacheSpec.uniform(
            data["num_layers"],
            data["num_kv_heads"],
            data["head_dim"],
            data["max_cache_len"],
            dtype,
            tuple(data["mask_kinds"]),
            data["sliding_window"],
        )
    tensors = tuple(
        CacheTensor(t["layer"], t["kind"], tuple(t["shape"]), _dtype(t["dtype"]), t.get("index", 0))
        for t in data["tensors"]
    )
    return CacheSpec(
        num_layers=data["num_layers"],
        max_cache_len=data["max_cache_len"],
        dtype=dtype,
        mask_kinds=tuple(data["mask_kinds"]),
        sliding_window=data["sliding_window"],
        tensors=tensors,
        chunk_size=data.get("chunk_size"),
    )


# ---- reading ---------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict:
    """The manifest of the engine at ``path``, after checking that it is one this specpass can read."""
    with _open(path) as z:
        return _manifest(z, path)


def read_signer(path: str | os.PathLike[str]) -> str | None:
    """The key fingerprint the engine's signature names (not verified: see load_engine's ``trust``), or None."""
    with _open(path) as z:
        return signing.signer(_signature_entry(z))


def _signature_entry(z: zipfile.ZipFile) -> bytes | None:
    try:
        return z.read(signing.SIGNATURE)
    except KeyError:
        return None


def _check_signature(z: zipfile.ZipFile, trust, path) -> str:
    """Verify the signature over the manifest's raw bytes against ``trust`` (keys or key files)."""
    keys = [signing.load_public_key(k) if isinstance(k, str | os.PathLike) else k for k in trust]
    try:
        raw = z.read(MANIFEST)
    except KeyError:
        raise SpecPassError(f"{path} is not a specpass engine (a zip archive without {MANIFEST})") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise SpecPassError(f"{path}: the engine's manifest is damaged ({e}); refusing to load it") from e
    return signing.verify(raw, _signature_entry(z), keys, path)


def _open(path) -> zipfile.ZipFile:
    """The engine's archive; refused unless every entry is stored uncompressed (as write_engine stores them), so
    that no entry expands past the size of the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecPassError(f"{path}: no such engine file")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SpecPassError(
            f"{path} is not a specpass engine, or it is truncated ({e}); write it again with specpass compile"
        ) from e
    packed = next(
        (i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size), None
    )
    if packed is not None:
        z.close()
        raise SpecPassError(
            f"{path}: entry {packed.filename!r} is compressed ({packed.compress_size} bytes expanding to "
            f"{packed.file_size}); specpass engines store entries uncompressed, so it is not one: refusing it"
        )
    return z


def _manifest(z: zipfile.ZipFile, path) -> dict:
    try:
        manifest = json.loads(z.read(MANIFEST))
    except KeyError:
        raise SpecPassError(f"{path} is not a specpass engine (a zip archive without {MANIFEST})") from None
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise SpecPassError(f"{path}: the engine's manifest is damaged ({e}); write it again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SpecPassError(f"{path} is not a specpass engine (its {MANIFEST} is not a specpass manifest)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SpecPassError(
            f"{path} has engine format {version}, newer than this specpass reads ({FORMAT_VERSION}): "
            "upgrade specpass, or compile the engine again with this one"
        )
    try:
        _check_fields(manifest)
    except _Malformed as e:
        raise SpecPassError(f"{path}: its manifest {e}; the engine is damaged or was not written by specpass") from e
    return manifest


def _check_fields(m: dict) -> None:
    """The manifest's fields that loading reads, checked for what write_engine puts there."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _Malformed(what)

    def strings(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    need(isinstance(m.get("versions"), dict) and isinstance(m["versions"].get("torch"), str), "has no torch version")
    payloads = m.get("payloads")
    need(strings(payloads) and all(re.fullmatch(r"[0-9a-f]{64}", v) for v in payloads.values()), "lists bad checksums")
    programs = m.get("programs")
    need(isinstance(programs, dict) and bool(programs), "lists no programs")
    for name, info in programs.items():
        need(bool(_PROGRAM_NAME.fullmatch(name)), f"names a program {name!r} (not a plain name)")
        need(isinstance(info, dict) and info.get("package") in payloads, f"gives program {name!r} no package")
        need(strings(info.get("constants")), f"gives program {name!r} bad constants")
        need(strings(info.get("lowbit_parts", {})), f"gives program {name!r} bad low-bit parts")
    rebuilt = m.get("rebuilt", {})
    need(isinstance(rebuilt, dict), "has bad rebuilt weights")
    for key, how in rebuilt.items():
        need(
            isinstance(how, dict)
            and isinstance(how.get("parts"), list)
            and len(how["parts"]) == 5
            and all(isinstance(p, str) for p in how["parts"])
            and isinstance(how.get("rows"), list)
            and len(how["rows"]) == 2
            and all(isinstance(r, int) for r in how["rows"])
            and how["rows"][0] < how["rows"][1]
            and how.get("bits") in (4, 8)
            and how.get("block") in (16, 32)
            and bool(re.fullmatch(r"[0-9a-f]{64}", str(how.get("sha256")))),
            f"says badly how to rebuild the weight {key!r}",
        )
    need(isinstance(m.get("vocab_size"), int) and m["vocab_size"] > 0, "has no vocabulary size")
    need(isinstance(m.get("generation_config"), dict), "has no generation config")
    need(m.get("plan") is None or isinstance(m["plan"], dict), "has a plan that is not an object")
    need(m.get("device", "cpu") in ("cpu", "cuda"), f"names the device {m.get('device')!r}")
    cpu = m.get("cpu")
    need(cpu is None or (isinstance(cpu, dict) and isinstance(cpu.get("isa"), str)), "has a bad CPU level")
    from specpass.kernels.choice import ORDER_KIND

    orders = (cpu or {}).get("orders", {})
    need(
        isinstance(orders, dict)
        and all(
            ORDER_KIND.fullmatch(kind) and isinstance(r, dict) and isinstance(r.get("stationary"), bool)
            for kind, r in orders.items()
        ),
        "has bad fp32 operand orders",
    )
    cache = m.get("cache")
    need(
        isinstance(cache, dict) and all(isinstance(cache.get(k), int) for k in ("num_layers", "max_cache_len")),
        "has no cache layout",
    )
    _dtype(cache.get("dtype"))
    for t in cache.get("tensors", []):
        need(isinstance(t, dict) and isinstance(t.get("shape"), list), "has a bad cache tensor")
        _dtype(t.get("dtype"))


def _check_torch(manifest: dict, path) -> None:
    built = manifest["versions"]["torch"]
    if _major_minor(built) != _major_minor(torch.__version__):
        raise SpecPassError(
            f"{path} was compiled with torch {built}; this is torch {torch.__version__}. AOTInductor packages "
            "do not load across torch versions: compile the engine again with this torch (specpass compile)"
        )


def _check_cpu(manifest: dict, packages: list[bytes], path) -> None:
    """Refuse an engine whose CPU programs hold instructions this CPU lacks: they would stop the process with an
    illegal instruction. An engine written before engines named their level (format 3 and older) was compiled
    for its CPU's own instructions; of those, the vector ISA its packages name is checked."""
    if manifest.get("device", "cpu") != "cpu":
        return
    cpu = manifest.get("cpu")
    if cpu is not None:
        lacks = cpu_target.missing(cpu["isa"], cpu.get("cpu_key"))
        what = f"for the x86-64 level {cpu['isa']!r} on {cpu.get('compiled_on', 'another CPU')}"
    else:
        flags = machine.cpu_flags()
        needs = {f for package in packages for f in cpu_target.package_needs(package)}
        lacks = sorted(needs - flags) if flags else []
        what = "for the instructions of the CPU that compiled it (-march=native: an engine of format 3 or older)"
    if lacks:
        level = cpu_target.default_level()
        portable = f", or there with `specpass compile --isa {level}` (this CPU's level), which runs on both"
        raise SpecPassError(
            f"{path} was compiled {what}; this CPU ({machine.cpu_model()}) lacks {', '.join(lacks)}, so its "
            f"programs would stop the process with an illegal instruction. Compile the engine again here"
            + (portable if level != cpu_target.NATIVE else "")
        )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _read_checked(z: zipfile.ZipFile, name: str, manifest: dict, path) -> bytes:
    expected = manifest["payloads"].get(name)
    if expected is None:
        raise SpecPassError(f"{path}: the manifest lists no checksum for {name}; the engine is damaged")
    digest, buf = hashlib.sha256(), io.BytesIO()
    try:
        with z.open(name) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                buf.write(chunk)
    except KeyError:
        raise SpecPassError(f"{path}: {name} is missing; the engine is damaged or truncated") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # zip's own CRC check, or a cut-off entry
        raise SpecPassError(f"{path}: {name} is damaged ({e}); write the engine again") from e
    if digest.hexdigest() != expected:
        raise SpecPassError(f"{path}: checksum mismatch for {name}; the engine is damaged, write it again")
    return buf.getvalue()


def _calls_kernels(manifest: dict) -> bool:
    """Whether some program calls one of specpass's C++ operators (passes/fused_attention.py's attention)."""
    return any(
        op.startswith("specpass.")
        for info in manifest["programs"].values()
        for op in info.get("summary", {}).get("ops", {})
    )


def load_engine(path: str | os.PathLike[str], *, trust=None) -> Engine:
    """Load an engine written by ``specpass compile`` (or ``write_engine``); the Python side of ``specpass run``.

    An engine holds native code that runs in this process. ``trust``: Ed25519 public keys (or key files); when
    given, an engine not signed by one of them is refused before any payload is read.
    """
    from safetensors.torch import load

    from specpass.lower.inductor import load_aoti_program
    from specpass.tune.plan import SpecPlan

    t0 = time.perf_counter()
    with _open(path) as z:
        signer = _check_signature(z, trust, path) if trust else None
        manifest = _manifest(z, path)
        _check_torch(manifest, path)
        # every checksum before anything is used
        data = {name: _read_checked(z, name, manifest, path) for name in manifest["payloads"]}
    _check_cpu(manifest, [data[info["package"]] for info in manifest["programs"].values()], path)
    device = torch.device(manifest.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecPassError(
            f"{path} was compiled for a CUDA GPU and torch {torch.__version__} sees none here; run it on a GPU "
            "machine, or compile the engine again on this one"
        )
    loaded = load(data.pop(WEIGHTS))
    # one tensor at a time into huge pages (hugepages.py), so that the copies never hold the weights twice
    weights = {key: backed(loaded.pop(key).to(device)) for key in list(loaded)}
    lowbit_choices, dense = {}, []
    if manifest.get("lowbit") or _calls_kernels(manifest):
        from specpass.kernels import KernelBuildError, load_kernels

        try:
            load_kernels()  # the programs call torch.ops.specpass.* (built here on first use)
        except KernelBuildError as e:
            what = "stores weights as low-bit blocks, read by" if manifest.get("lowbit") else "calls"
            raise SpecPassError(
                f"{path} {what} specpass's C++ kernels, which cannot be built here: {str(e).splitlines()[0]} (install "
                "one, or compile the engine with --no-exact-lowbit: it then needs none)"
            ) from e
    if manifest.get("lowbit"):
        weights.update(_rebuild(manifest.get("rebuilt", {}), weights, path))
        lowbit_choices, dense = _lowbit_where_faster(manifest, weights, path)
    order_choices = _orders_here(manifest, weights, path)
    programs = {}
    for name, info in manifest["programs"].items():
        missing = sorted(set(info["constants"].values()) - set(weights))
        if missing:
            raise SpecPassError(
                f"{path}: program {name!r} names weights the engine lacks ({missing[:3]}); it is damaged"
            )
        constants = {fqn: weights[key] for fqn, key in info["constants"].items()}
        try:
            programs[name] = load_aoti_program(data.pop(info["package"]), constants, name, device)
        except SpecPassError:
            raise
        except Exception as e:  # noqa: BLE001 - a package this torch cannot load: say so, not a C++ trace
            raise SpecPassError(
                f"{path}: program {name!r} could not be loaded by torch {torch.__version__} "
                f"({type(e).__name__}: {e}); compile the engine again"
            ) from e
    tokenizer_files = {name.removeprefix("tokenizer/"): b for name, b in data.items() if name.startswith("tokenizer/")}
    plan = SpecPlan.from_json(json.dumps(manifest["plan"])) if manifest["plan"] else None
    engine = Engine(programs, manifest, tokenizer_files, plan, device)
    engine.signer = signer
    engine.lowbit_choices = lowbit_choices
    engine.order_choices = order_choices
    if dense:  # the kernel library holds these fp32 weights for the engine: freed with it
        from specpass.kernels.choice import forget_dense

        weakref.finalize(engine, forget_dense, dense)
    if RECYCLED in data:
        engine.recycled.load_state_dict(load(data[RECYCLED]))
    engine.load_s = time.perf_counter() - t0
    log.info("loaded engine %s in %.2fs", path, engine.load_s)
    return engine


def _rebuild(rebuilt: dict[str, dict], weights: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The fp32 weights the engine does not store, rebuilt from their blocks (rows of one matrix each call
    rebuilds), each checked against the sha256 of the weight that was compiled."""
    out: dict[str, torch.Tensor] = {}
    full: dict[tuple, torch.Tensor] = {}
    for key, how in rebuilt.items():
        parts = tuple(how["parts"])
        if parts not in full:
            missing = [p for p in parts if p not in weights]
            if missing:
                raise SpecPassError(f"{path}: weight {key} is rebuilt from blocks the engine lacks ({missing[:2]})")
            full[parts] = torch.ops.specpass.lowbit_dequantize(*(weights[p] for p in parts), how["block"], how["bits"])
        r0, r1 = how["rows"]
        out[key] = full[parts][r0:r1]  # rows of a contiguous matrix: contiguous, no copy
        if _sha256(out[key]) != how["sha256"]:
            raise SpecPassError(
                f"{path}: weight {key} rebuilt from its blocks differs from the one compiled (sha256); the engine "
                "is damaged, or this CPU's low-bit kernels rebuild weights wrongly: write the engine again"
            )
    return out


def _lowbit_where_faster(manifest: dict, weights: dict[str, torch.Tensor], path) -> tuple[dict, list]:
    """The engine's low-bit calls timed against fp32 on this CPU; where fp32 wins (a CPU without a fast path for
    the kernel), the kernel multiplies by fp32 weights rebuilt from the blocks. Returns the measurements and the
    codes tensors read as fp32."""
    from specpass.kernels import BLOCK_PARTS, choice

    if choice.mode() == "always":
        return {}, []
    calls: dict[str, list[tuple]] = {}
    for name, info in manifest["programs"].items():
        regime = "prefill" if name == "prefill" else "few_tokens"
        for call in info.get("lowbit_calls", []):
            if call["op"] != "linear":
                continue
            blocks = []
            for param, part in zip(call["params"], BLOCK_PARTS, strict=True):
                if part in call.get("empty", ()):  # no elements: the package holds no constant for it
                    empty = {"exc_ids": (0,), "exc_values": (0, call["block"])}.get(part, (0,))
                    blocks.append(torch.empty(empty, dtype=torch.int64 if part == "exc_ids" else torch.float32))
                elif param in info["constants"]:
                    blocks.append(weights[info["constants"][param]])
                elif param in info.get("lowbit_parts", {}):
                    blocks.append(weights[info["lowbit_parts"][param]])
                else:
                    raise SpecPassError(f"{path}: a low-bit call of program {name!r} names a missing weight {param}")
            calls.setdefault(regime, []).append((*blocks, call["block"], call["bits"], call["shapes"]))
    return choice.use_dense_where_faster(calls)


def _orders_here(manifest: dict, weights: dict[str, torch.Tensor], path) -> dict:
    """The fp32 operand orders the engine's programs were compiled with, timed again on this CPU when it is not the
    one that compiled them (the faster order differs between CPUs: W @ x.T 2-8x faster on a Zen 4, 2.4x slower on
    a Xeon). A compiled program cannot change its order: where the other order is faster here, a warning says
    how much, and that compiling the engine on this CPU gets it. Returns this CPU's measurements."""
    from specpass.kernels import choice

    cpu = manifest.get("cpu") or {}
    if not cpu.get("orders") or cpu.get("cpu_key") == machine.cpu_key():
        return {}
    here, slower = {}, []
    for kind, there in cpu["orders"].items():
        shape = choice.order_shape(kind)
        same = [w for w in weights.values() if w.dtype == torch.float32 and tuple(w.shape) == shape]
        if not same:
            continue
        here[kind] = result = choice.stationary_faster(same)
        if result["linear_ms"] is not None and result["stationary"] != there["stationary"]:
            compiled, best = sorted((result["linear_ms"], result["stationary_ms"]), reverse=True)
            slower.append(f"{shape[0]}x{shape[1]} {compiled / best:.1f}x")
    if slower:
        log.warning(
            "%s was compiled on %s, where the other operand order multiplied fp32 weights faster; here its "
            "products of a few tokens are slower than they could be (%s): compile the engine on this CPU "
            "(specpass compile) for faster decoding",
            path,
            cpu.get("compiled_on", "another CPU"),
            ", ".join(slower),
        )
    return here


class Engine(CompiledLM):
    """A loaded engine: ``generate`` as SpecModel's, plus the tokenizer (``tokenizers``, no transformers)."""

    _larger_cache = "compile the engine again with a larger --max-cache-len"

    def __init__(self, programs: dict, manifest: dict, tokenizer_files: dict[str, bytes], plan, device):
        super().__init__(
            programs,
            _spec_from_json(manifest["cache"]),
            vocab_size=manifest["vocab_size"],
            generation_config=types.SimpleNamespace(**manifest["generation_config"]),
            device=device,
        )
        self.manifest = manifest
        self.plan = plan
        self.load_s = 0.0
        self.lowbit_choices: dict[str, dict] = {}  # kind of low-bit call -> kernel and fp32 times on this CPU
        self.signer: str | None = None  # the trusted key that signed it, when loaded with trust=
        self.tokenizer = None
        self._tokenizer_config: dict = {}
        self._chat_template = None
        if "tokenizer.json" in tokenizer_files:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(tokenizer_files["tokenizer.json"].decode())
            if "tokenizer_config.json" in tokenizer_files:
                self._tokenizer_config = json.loads(tokenizer_files["tokenizer_config.json"])
            template = tokenizer_files.get("chat_template.jinja")
            self._chat_template = template.decode() if template else self._tokenizer_config.get("chat_template")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise SpecPassError("this engine was compiled without a tokenizer: pass token ids, not text")
        return self.tokenizer

    def chat_ids(self, text: str) -> torch.Tensor:
        """(1, n) ids of ``text`` as the first user turn of a chat: what specpass.models.chat_ids gives."""
        tok = self._need_tokenizer()
        if self._chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # As transformers renders chat templates (its apply_chat_template), without importing it.
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error
            specials = {k: v for k, v in self._tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
            text = env.from_string(self._chat_template).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True, **specials
            )
            return torch.tensor([tok.encode(text, add_special_tokens=False).ids], dtype=torch.long)
        return self.encode(text)

    def encode(self, text: str) -> torch.Tensor:
        """(1, n) ids of ``text`` as it is (with the tokenizer's own special tokens), no chat template."""
        return torch.tensor([self._need_tokenizer().encode(text).ids], dtype=torch.long)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._need_tokenizer().decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


def _raise_template_error(message: str):
    raise SpecPassError(f"the engine's chat template refused the prompt: {message}")
