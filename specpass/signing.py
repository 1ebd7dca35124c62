"""Ed25519 signatures on engine files: who wrote an engine, not only that it arrived intact.

An engine holds AOTInductor shared libraries, native code that ``specpass run`` loads into its process. The
manifest's sha256 of every payload proves integrity, not origin: anyone can write a consistent engine. A
signature over the manifest's exact bytes (which name every payload's sha256) ties the whole file to a key;
``specpass run --trust KEY.pub`` checks it before any payload is read, extracted or loaded.

Keys: ``specpass keygen PATH`` writes PATH (the private key, PKCS#8 PEM, mode 0600) and PATH.pub; keys from
``openssl genpkey -algorithm ed25519`` or ``ssh-keygen -t ed25519`` (PEM or OpenSSH formats) work too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from specpass.errors import SpecPassError

#: the zip entry that holds the signature (not itself listed among the manifest's payloads)
SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise SpecPassError(
            f"signing engines needs the 'cryptography' package ({e}); pip install 'cryptography>=42'"
        ) from e
    return serialization, ed25519, InvalidSignature


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SpecPassError(f"cannot read the {what} {path}: {e.strerror or e}") from e


def load_private_key(path: str | os.PathLike[str]):
    """An Ed25519 private key from a PEM (PKCS#8) or OpenSSH file without a passphrase."""
    serialization, ed25519, _ = _crypto()
    data = _read(path, "signing key")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SpecPassError(
            f"{path} is not an unencrypted private key ({e}); make one with specpass keygen {path}"
        ) from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SpecPassError(f"{path} holds a {type(key).__name__}; engines are signed with Ed25519 keys")
    return key


def load_public_key(path: str | os.PathLike[str]):
    """An Ed25519 public key from a PEM file or an OpenSSH ``ssh-ed25519 ...`` line."""
    serialization, ed25519, _ = _crypto()
    data = _read(path, "trusted key")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SpecPassError(f"{path} is not a public key ({e}); pass the .pub file that specpass keygen wrote") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SpecPassError(f"{path} holds a {type(key).__name__}; engines are signed with Ed25519 keys")
    return key


def fingerprint(public_key) -> str:
    """``SHA256:...`` of the raw public key, as ``ssh-keygen -l`` prints it."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def sign(manifest: bytes, private_key) -> bytes:
    """The signature entry for ``manifest`` (JSON: algorithm, signer's fingerprint, signature)."""
    entry = {
        "algorithm": ALGORITHM,
        "key": fingerprint(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest)).decode(),
    }
    return json.dumps(entry).encode()


def signer(entry: bytes | None) -> str | None:
    """The fingerprint a signature entry names (unverified), or None for an unsigned engine."""
    if entry is None:
        return None
    try:
        return str(json.loads(entry)["key"])
    except (ValueError, KeyError, TypeError):
        return "(unreadable signature)"


def verify(manifest: bytes, entry: bytes | None, trusted: list, path) -> str:
    """Check that ``entry`` signs ``manifest`` with one of the ``trusted`` public keys; returns its fingerprint.

    Raises SpecPassError (one line) for an unsigned engine, a key not trusted, or a signature that does not match.
    """
    _, _, InvalidSignature = _crypto()
    if entry is None:
        raise SpecPassError(
            f"{path} is not signed; refusing to load it under --trust (its native code could be anyone's)"
        )
    try:
        data = json.loads(entry)
        algorithm, named, signature = data["algorithm"], data["key"], base64.b64decode(data["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SpecPassError(f"{path}: its signature entry is damaged; refusing to load it") from None
    if algorithm != ALGORITHM:
        raise SpecPassError(f"{path} is signed with {algorithm!r}, not {ALGORITHM}; refusing to load it")
    by_print = {fingerprint(k): k for k in trusted}
    key = by_print.get(named)
    if key is None:
        raise SpecPassError(
            f"{path} is signed by {named}, which is not a trusted key ({', '.join(by_print)}); refusing to load it"
        )
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise SpecPassError(
            f"{path}: the signature by {named} does not match the manifest (the engine was altered after signing); "
            "refusing to load it"
        ) from None
    return named


def generate_key(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write a new Ed25519 private key to ``path`` (mode 0600) and its public key to ``path.pub``.

    Returns (the public key's path, its fingerprint); refuses to overwrite an existing file.
    """
    serialization, ed25519, _ = _crypto()
    path = Path(path).expanduser()
    public_path = path.with_name(path.name + ".pub")
    for p in (path, public_path):
        if p.exists():
            raise SpecPassError(f"{p} exists; choose another path (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        public_path.write_bytes(public)
    except OSError as e:
        for p in (path, public_path):  # no half of a key pair left behind
            p.unlink(missing_ok=True)
        raise SpecPassError(f"cannot write the key pair at {path}: {e.strerror or e}") from e
    return public_path, fingerprint(key.public_key())
