"""Detached ed25519 signatures of an artifact's manifest (optional extra `sign`: the `cryptography` package).

The manifest holds the SHA-256 of every other file, so signing manifest.json signs the whole artifact; the
signature lives next to it in manifest.sig. Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo
public key), as `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import MANIFEST, SIGNATURE, ArtifactError

_MISSING = "signing artifacts needs the `cryptography` package: pip install 'kiln[sign]'"


def _serialization() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as err:
        raise ArtifactError(_MISSING) from err
    return serialization


def _key(path: str | Path, private: bool) -> Any:
    serialization = _serialization()
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable PEM ed25519 {'private' if private else 'public'} key") from err
    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, kind):
        raise ArtifactError(f"{path}: not an ed25519 key")
    return key


def sign(root: Path, private_key: str | Path) -> Path:
    """Write root/manifest.sig, the signature of root/manifest.json with `private_key`."""
    key = _key(private_key, private=True)
    out = root / SIGNATURE
    out.write_bytes(key.sign((root / MANIFEST).read_bytes()))
    return out


def check_signature(root: Path, trusted_key: str | Path) -> None:
    """Refuse the artifact unless manifest.sig is a valid signature of manifest.json by `trusted_key`."""
    key = _key(trusted_key, private=False)
    from cryptography.exceptions import InvalidSignature

    signature = root / SIGNATURE
    if not signature.is_file() or signature.is_symlink():
        raise ArtifactError(f"{root}: unsigned artifact ({SIGNATURE} is missing) and a trusted key was given")
    try:
        key.verify(signature.read_bytes(), (root / MANIFEST).read_bytes())
    except InvalidSignature as err:
        raise ArtifactError(f"{root}: {SIGNATURE} is not a valid signature of {MANIFEST} by {trusted_key}") from err
