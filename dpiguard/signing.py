"""Ed25519 keys as dpiguard keeps them: PEM files, created once, named by a short fingerprint.

The same kind of key signs the identity assertions sent to the DPI (``decision/assertion.py``) and the
checkpoints of the audit chain (``audit/chain.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def key_id(public_key: Ed25519PublicKey) -> str:
    """Stable short identifier of a public key (first 16 hex digits of its SHA-256)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> None:
    """Write a new Ed25519 key pair as PEM files; the private one is created with mode 0600.

    Refuses (``FileExistsError``) to overwrite either file.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists, refusing to overwrite")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_exclusive(private_path, private_pem, 0o600)
    _write_exclusive(public_path, public_pem, 0o644)


def _write_exclusive(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # the umask may have removed bits; never added any
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
