"""Certificates and keys for a federation: a local CA, the SuperLink's TLS pair, one key pair per hospital.

- ``ca.crt`` / ``ca.key``: the federation's certificate authority. Keep ``ca.key`` offline.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate (SANs: the given hosts).
- ``hospitals/<name>`` / ``<name>.pub``: each hospital's SuperNode authentication key pair
  (ECDSA P-384, OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` expect). The private key stays at the hospital.

Private keys are written with mode 0600. Nothing here belongs in version control.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedLesion federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(out: str | Path, hospitals: Sequence[str], hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> dict[str, Path]:
    """Write the CA, the SuperLink's TLS pair and one authentication key pair per hospital.

    Args:
        out: the folder to write into.
        hospitals: hospital names (letters, digits, ``-`` and ``_``).
        hosts: DNS names and IP addresses the SuperLink is reached at (certificate SANs).

    Returns:
        Name -> path of every file written.

    Raises:
        ValueError: for an empty or unsafe hospital name, or no host.
    """
    if not hosts:
        raise ValueError("give at least one host the SuperLink is reached at, e.g. localhost.")
    for name in hospitals:
        if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
            raise ValueError(f"hospital name '{name}' must use only letters, digits, '-' and '_'.")
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("FedLesion CA")).issuer_name(_name("FedLesion CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    files = {
        "ca.crt": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca.key": _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, plain), private=True),
        "superlink.crt": _write(out / "superlink.crt", server_cert.public_bytes(pem)),
        "superlink.key": _write(out / "superlink.key", server_key.private_bytes(pem, pkcs8, plain), private=True),
    }
    for name in hospitals:
        key = ec.generate_private_key(ec.SECP384R1())
        files[name] = _write(out / "hospitals" / name, key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, plain), private=True)
        files[f"{name}.pub"] = _write(out / "hospitals" / f"{name}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return files
