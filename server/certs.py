"""The federation's certificate authority and the SuperLink's TLS pair, made at the coordinating site.

- ``ca.crt`` / ``ca.key``: the federation's certificate authority. ``ca.key`` can be
  passphrase-protected; keep it offline. An existing CA is never overwritten.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate. Its SANs are the
  hosts hospitals reach it at plus ``localhost``, ``127.0.0.1`` and ``::1`` (the control address
  ``flwr`` uses on the SuperLink's own machine).

Each hospital makes its own SuperNode key pair (:mod:`fedlesion.client.keys`, ``fedlesion keygen``) and
sends only the public key: the coordinator never holds a hospital's private key.

Private keys are created with mode 0600 (:func:`fedlesion.common.files.write_private`). Nothing here
belongs in version control.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlesion.common.files import PUBLIC_FILE_MODE, write_new, write_private

VALID_DAYS = 365
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the control address is reached on the SuperLink's own machine
FILES = ("ca.crt", "ca.key", "superlink.crt", "superlink.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedLesion federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(out: str | Path, hosts: Sequence[str] = LOCAL_HOSTS,
                      ca_passphrase: bytes | None = None) -> dict[str, Path]:
    """Write a new CA and the SuperLink's TLS pair signed by it.

    Args:
        out: the folder to write into; it must not hold any of :data:`FILES` yet.
        hosts: DNS names and IP addresses hospitals reach the SuperLink at (certificate SANs);
            ``localhost``, ``127.0.0.1`` and ``::1`` are always added.
        ca_passphrase: encrypts ``ca.key`` (best available PKCS#8 encryption) when given.

    Returns:
        Name -> path of every file written.

    Raises:
        ValueError: for no host, an empty host or an empty passphrase.
        FileExistsError: when ``out`` already holds a CA or SuperLink pair (nothing is written).
    """
    hosts = [h.strip() for h in hosts]
    if not hosts or not all(hosts):
        raise ValueError("give the hosts the SuperLink is reached at, e.g. fl.example.org,10.0.0.5.")
    if ca_passphrase is not None and not ca_passphrase:
        raise ValueError("the CA passphrase is empty; give a non-empty one or none.")
    out = Path(out)
    found = [name for name in FILES if os.path.lexists(out / name)]
    if found:
        raise FileExistsError(f"{out} already holds {', '.join(found)}: a CA is never overwritten (every "
                              "certificate it signed would stop working). Choose another folder.")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("FedLesion CA")).issuer_name(_name("FedLesion CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    ca_encryption = (serialization.BestAvailableEncryption(ca_passphrase) if ca_passphrase
                     else serialization.NoEncryption())
    out.mkdir(parents=True, exist_ok=True)
    # Keys first: if one cannot be created, no certificate points at a key that does not exist.
    files = {
        "ca.key": write_private(out / "ca.key", ca_key.private_bytes(pem, pkcs8, ca_encryption)),
        "superlink.key": write_private(out / "superlink.key",
                                       server_key.private_bytes(pem, pkcs8, serialization.NoEncryption())),
    }
    files["ca.crt"] = write_new(out / "ca.crt", ca_cert.public_bytes(pem), PUBLIC_FILE_MODE)
    files["superlink.crt"] = write_new(out / "superlink.crt", server_cert.public_bytes(pem), PUBLIC_FILE_MODE)
    return files
