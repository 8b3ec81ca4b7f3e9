"""A hospital's SuperNode authentication key pair, made at the hospital.

The private key never leaves the hospital; the coordinator registers only the public key
(``flwr supernode register <name>.pub``). The pair is what Flower's own instructions make with
``ssh-keygen -t ecdsa -b 384 -N "" -f <name>``: ECDSA P-384 in OpenSSH format, as
``flower-supernode --auth-supernode-private-key`` expects.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlesion.common.files import PUBLIC_FILE_MODE, write_new, write_private


def fingerprint(public_key_line: str) -> str:
    """The OpenSSH ``SHA256:...`` fingerprint of an OpenSSH public key line (as ``ssh-keygen -lf`` prints),
    for the hospital and the coordinator to compare over a second channel (a phone call) before registering.

    Raises:
        ValueError: when the line is not an OpenSSH public key.
    """
    parts = public_key_line.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, ValueError):
        raise ValueError("not an OpenSSH public key line ('<type> <base64> [comment]').") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_hospital_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``out/<name>`` (private, mode 0600 from creation) and ``out/<name>.pub``.

    Returns:
        ``(private key path, public key path)``.

    Raises:
        ValueError: for an empty or unsafe name.
        FileExistsError: when either file exists (nothing is overwritten).
    """
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ValueError(f"hospital name '{name}' must use only letters, digits, '-' and '_'.")
    out = Path(out)
    private, public = out / name, out / f"{name}.pub"
    for path in (private, public):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; it is never overwritten (move it away first).")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_new(public, line + f" {name}\n".encode(), PUBLIC_FILE_MODE)
    return private, public
