"""The coordinator's CA and SuperLink pair, each hospital's own key pair, and private files and folders."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import fedlesion.common.files
from fedlesion.client.keys import fingerprint, make_hospital_key
from fedlesion.common.files import private_folder, write_private
from fedlesion.server.certs import make_certificates


@pytest.fixture(autouse=True)
def usual_umask() -> None:
    """The usual umask (0644 for ordinary files), restored afterwards."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def modes_at_write(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The mode each file has at the moment bytes are first written to it through :mod:`fedlesion.common.files`."""
    seen: dict[str, int] = {}
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        seen.setdefault(os.readlink(f"/proc/self/fd/{fd}"), stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(fedlesion.common.files.os, "write", write)
    return seen


def test_ca_and_superlink_pair(tmp_path: Path, modes_at_write: dict[str, int]) -> None:
    files = make_certificates(tmp_path / "certs", ["fl.example.org", "10.0.0.5"], ca_passphrase=b"correct horse")
    assert sorted(files) == ["ca.crt", "ca.key", "superlink.crt", "superlink.key"]
    # Private keys: 0600 from the moment they exist, not written wider and narrowed afterwards.
    assert {k: v for k, v in modes_at_write.items() if k.endswith(".key")} == {
        str(files["ca.key"]): 0o600, str(files["superlink.key"]): 0o600}
    assert all(stat.S_IMODE(files[k].stat().st_mode) == 0o600 for k in ("ca.key", "superlink.key"))
    # The CA key is encrypted with the passphrase.
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(files["ca.key"].read_bytes(), password=None)
    ca_key = serialization.load_pem_private_key(files["ca.key"].read_bytes(), password=b"correct horse")
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    assert ca.public_key().public_numbers() == ca_key.public_key().public_numbers()
    server = x509.load_pem_x509_certificate(files["superlink.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {*sans.get_values_for_type(x509.DNSName), *map(str, sans.get_values_for_type(x509.IPAddress))}
    assert names == {"fl.example.org", "10.0.0.5", "localhost", "127.0.0.1", "::1"}  # loopback: the control address
    assert stat.S_IMODE(files["ca.crt"].stat().st_mode) == 0o644  # public


def test_a_ca_is_never_overwritten(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_certificates(tmp_path)
    (tmp_path / "superlink.key").unlink()  # any one of the four files is enough to refuse
    with pytest.raises(FileExistsError, match="ca.crt, ca.key, superlink.crt"):
        make_certificates(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {k: v for k, v in before.items() if k != "superlink.key"}


@pytest.mark.parametrize("hosts, passphrase, match", [
    ([], None, "give the hosts"),
    (["fl.example.org", " "], None, "give the hosts"),
    (["localhost"], b"", "passphrase is empty"),
])
def test_bad_certificate_arguments(tmp_path: Path, hosts: list[str], passphrase: bytes | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_certificates(tmp_path / "certs", hosts, ca_passphrase=passphrase)
    assert not (tmp_path / "certs").exists()


def test_hospital_makes_its_own_key(tmp_path: Path, modes_at_write: dict[str, int]) -> None:
    private, public = make_hospital_key(tmp_path / "keys", "hospital-a")
    assert modes_at_write == {str(private): 0o600, str(public): 0o644}
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"  # what Flower's SuperNode authentication expects
    loaded = serialization.load_ssh_public_key(public.read_bytes())
    assert loaded.public_numbers() == key.public_key().public_numbers()
    if shutil.which("ssh-keygen"):  # the fingerprint the coordinator compares with `ssh-keygen -lf`
        printed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True).stdout
        assert printed.split()[1] == fingerprint(public.read_text())
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_hospital_key(tmp_path / "keys", "hospital-a")
    assert serialization.load_ssh_private_key(private.read_bytes(), password=None).private_numbers() == key.private_numbers()


@pytest.mark.parametrize("name", ["", "../escape", "a b", "hospital/a"])
def test_unsafe_hospital_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        make_hospital_key(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_refuses_what_is_not_a_key() -> None:
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        fingerprint("ecdsa-sha2-nistp384 not*base64")


def test_write_private_never_follows_or_replaces(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("link", "dangling", "elsewhere"):
        with pytest.raises(FileExistsError):
            write_private(tmp_path / name, b"secret")
    assert target.read_text() == "keep" and not (tmp_path / "nowhere").exists()
    with pytest.raises(FileExistsError):  # a dangling link where the public key goes: nothing is written
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "h.pub").symlink_to(tmp_path / "nowhere")
        make_hospital_key(tmp_path / "keys", "h")
    assert not (tmp_path / "keys" / "h").exists() and not (tmp_path / "nowhere").exists()


def test_private_folder(tmp_path: Path) -> None:
    made = private_folder(tmp_path / "new")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    readable = tmp_path / "readable"
    readable.mkdir()
    os.chmod(readable, 0o755)
    assert stat.S_IMODE(private_folder(readable).stat().st_mode) == 0o700  # narrowed: nothing could be planted
    for mode in (0o777, 0o770, 0o702):  # others could have planted files: refused, not narrowed and trusted
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        os.chmod(shared, mode)
        with pytest.raises(PermissionError, match="can be written by its group or by others"):
            private_folder(shared)
        assert stat.S_IMODE(shared.stat().st_mode) == mode
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(PermissionError, match="not a link"):
        private_folder(tmp_path / "link")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_private_folder_refuses_another_users_folder(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by user 65534"):
        private_folder(theirs)
