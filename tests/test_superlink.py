"""`fedlesion superlink`: what the Fleet address serves, and the options it refuses (the real-process test is in test_deployment)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedlesion.server.certs import make_certificates
from fedlesion.server.superlink import FleetOnlyOnPublicAddress, check_flower_config, parse_address, serve

CONTROL = ("127.0.0.1", 9093)


def _call(path: str, server: tuple[str, int] | None, kind: str = "http") -> list[dict[str, Any]]:
    """Send one request through the middleware; returns what was sent back, or [{'reached': path}]."""
    sent: list[dict[str, Any]] = []

    async def flower(scope: dict[str, Any], receive: Any, send: Any) -> None:
        sent.append({"reached": scope["path"]})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path, "server": server, "client": ("127.0.0.1", 50000)}
    asyncio.run(FleetOnlyOnPublicAddress(flower, CONTROL[1])(scope, receive, send))
    return sent


@pytest.mark.parametrize("path, server, reaches", [
    ("/v1/fleet/pull-messages", ("10.0.0.5", 9092), True),
    ("/health", ("10.0.0.5", 9092), True),
    ("/v1/control/register-node", ("10.0.0.5", 9092), False),
    ("/v1/control/start-run", ("127.0.0.1", 9092), False),  # loopback, but the Fleet listener
    ("/v1/runtime/pull-task-input", ("10.0.0.5", 9092), False),
    ("/docs", ("10.0.0.5", 9092), False),
    ("/v1/fleetx/anything", ("10.0.0.5", 9092), False),
    ("/v1/control/start-run", None, False),  # no local address known: Fleet only
    ("/v1/control/start-run", ("127.0.0.1", 9093), True),
    ("/v1/runtime/pull-task-input", ("127.0.0.1", 9093), True),
    ("/v1/fleet/pull-messages", ("127.0.0.1", 9093), True),
])
def test_only_the_control_listener_serves_control_and_runtime(path: str, server: tuple[str, int] | None, reaches: bool) -> None:
    sent = _call(path, server)
    if reaches:
        assert sent == [{"reached": path}]
    else:
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 404
        assert not any("reached" in m for m in sent)


def test_websockets_on_the_fleet_listener_are_closed() -> None:
    assert _call("/v1/control/stream", ("10.0.0.5", 9092), "websocket") == [{"type": "websocket.close", "code": 1008}]


def test_lifespan_passes_through() -> None:
    sent: list[str] = []

    async def flower(scope: dict[str, Any], receive: Any, send: Any) -> None:
        sent.append(scope["type"])

    asyncio.run(FleetOnlyOnPublicAddress(flower, CONTROL[1])({"type": "lifespan"}, None, None))
    assert sent == ["lifespan"]


@pytest.mark.parametrize("address, expected", [("0.0.0.0:9092", ("0.0.0.0", 9092)), ("[::1]:9093", ("::1", 9093))])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address, "--fleet-address") == expected


@pytest.mark.parametrize("address, match", [
    ("fl.example.org:9092", "must be an IP address"), ("127.0.0.1", "must be an IP address"),
    ("127.0.0.1:0", "between 1 and 65535"), ("127.0.0.1:70000", "must be an IP address and port"),
])
def test_bad_addresses(address: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_address(address, "--control-address")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    return ["--ssl-ca-certfile", str(certs["ca.crt"]), "--ssl-certfile", str(certs["superlink.crt"]),
            "--ssl-keyfile", str(certs["superlink.key"])]


@pytest.mark.parametrize("fleet, control, extra, env, match", [
    ("0.0.0.0:9093", "127.0.0.1:9093", ["--enable-supernode-auth"], {}, "different ports"),
    ("0.0.0.0:9092", "0.0.0.0:9093", ["--enable-supernode-auth"], {}, "would accept anyone's flwr commands"),
    ("0.0.0.0:9092", "[::]:9093", ["--enable-supernode-auth"], {}, "would accept anyone's flwr commands"),
    # Flower's parser takes abbreviations: --insec is --insecure, which would serve plain HTTP.
    ("0.0.0.0:9092", "127.0.0.1:9093", ["--insec"], {}, "TLS is required"),
    ("0.0.0.0:9092", "127.0.0.1:9093", [], {}, "--enable-supernode-auth is required"),
    ("0.0.0.0:9092", "127.0.0.1:9093", ["--enable-supernode-auth", "--sim"], {}, "--simulation has no SuperNodes"),
    ("0.0.0.0:9092", "127.0.0.1:9093", ["--enable-supernode-auth"], {"FLWR_INTERNAL_GRPC_CONTROL_API": "1"},
     "unset FLWR_INTERNAL_GRPC_CONTROL_API"),
])
def test_serve_refuses_before_listening(tls: list[str], fleet: str, control: str, extra: list[str],
                                        env: dict[str, str], match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    listened: list = []
    monkeypatch.setattr("fedlesion.server.superlink._listen", lambda *a: listened.append(a))
    with pytest.raises(ValueError, match=match):
        serve(fleet, control, [*tls, *extra])
    assert listened == []


def test_without_tls_files_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower itself exits when asked for TLS without its files; either way nothing listens."""
    listened: list = []
    monkeypatch.setattr("fedlesion.server.superlink._listen", lambda *a: listened.append(a))
    with pytest.raises((ValueError, SystemExit)):
        serve("0.0.0.0:9092", "127.0.0.1:9093", ["--enable-supernode-auth"])
    assert listened == []


def test_a_good_configuration_passes_the_check(tls: list[str]) -> None:
    import importlib
    import sys

    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")
    argv, sys.argv = sys.argv, ["flower-superlink", *tls, "--enable-supernode-auth", "--host", "127.0.0.1", "--port", "9093"]
    try:
        config = flower._parse_superlink_lifespan_config()
    finally:
        sys.argv = argv
    check_flower_config(config, CONTROL)  # no error
    with pytest.raises(ValueError, match="set by fedlesion superlink"):
        check_flower_config(config, ("127.0.0.1", 9094))
