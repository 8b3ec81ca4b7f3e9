"""Flower's SuperLink with the Control and Runtime APIs kept off the address hospitals connect to.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``, ``flwr stop``) and the Runtime API (the ServerApp) from one HTTP listener
(``flwr/superlink/main.py::create_app`` mounts all three routers; ``--control-api-address`` is
deprecated and no longer separates them), and the open-source build does not authenticate the
Control API. Anyone who can reach that listener and holds the public CA certificate could
register their own SuperNode key, submit an app whose ClientApp then runs inside every
hospital's SuperNode, or stop runs.

:func:`serve` runs Flower's own SuperLink app (its routers, middleware, lifespan and SuperExec
unchanged) on two listeners: a **Fleet address** for the hospitals, which answers only
``/v1/fleet/*`` and ``/health`` (everything else is 404), and a **control address**, by default
on loopback, which answers everything. The coordinator runs ``flwr`` on the SuperLink's own
machine against the control address; the firewall opens only the Fleet port.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

FLEET_PREFIXES = ("/v1/fleet/", "/health")  # all a SuperNode (or a load balancer's probe) needs
# Flower starts its legacy gRPC APIs on their own addresses when these are "1", outside the filter below.
LEGACY_GRPC_VARIABLES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def parse_address(address: str, what: str) -> tuple[str, int]:
    """``IP:port`` (IPv6 as ``[::1]:port``), parsed by Flower's own address parser; a literal IP is required.

    Raises:
        ValueError: naming ``what`` when the address is not ``IP:port``.
    """
    from flwr.supercore.address import parse_address as flower_parse_address

    parsed = flower_parse_address(address)
    try:
        host = str(ipaddress.ip_address(parsed[0])) if parsed else ""
    except ValueError:
        host = ""
    if not parsed or not host:
        raise ValueError(f"{what} '{address}' must be an IP address and port, e.g. 0.0.0.0:9092 or 127.0.0.1:9093.")
    if not 0 < parsed[1] < 65536:
        raise ValueError(f"{what} '{address}': the port must be between 1 and 65535.")
    return host, parsed[1]


class FleetOnlyOnPublicAddress:
    """ASGI middleware: a request that did not arrive on the control listener reaches only the
    Fleet API and the health check. Decided by the local port the connection was accepted on
    (the ASGI ``server`` field; the two listeners' ports differ), so neither a client address
    nor a header can change it. Flower's routes match whole paths, so a prefix cannot smuggle
    a Control route (``/v1/fleet/../control/...`` matches no route)."""

    def __init__(self, app: Any, control_port: int) -> None:
        self.app = app
        self.control_port = control_port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            on_control = server is not None and len(server) >= 2 and server[1] == self.control_port
            if not on_control and not str(scope.get("path", "")).startswith(FLEET_PREFIXES):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"not served on the Fleet address\n"
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def check_flower_config(config: Any, control: tuple[str, int]) -> None:
    """Refuse a parsed Flower SuperLink configuration this deployment must not run with.

    Flower's parser accepts abbreviations (``--insec`` is ``--insecure``), so the parsed values
    are checked, not the option strings.

    Raises:
        ValueError: without TLS, without SuperNode authentication, in simulation mode, when
            the Runtime API would not be on the control address, or when a legacy gRPC API
            would be started outside the Fleet-only filter.
    """
    if getattr(config, "insecure", False) or config.certificates is None or not config.ssl_certfile:
        raise ValueError("TLS is required: give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (see "
                         "`fedlesion certs`), and no --insecure.")
    if not config.enable_supernode_auth:
        raise ValueError("--enable-supernode-auth is required: without it the Fleet API lets anyone who holds "
                         "ca.crt register a SuperNode and join.")
    if config.simulation:
        raise ValueError("--simulation has no SuperNodes to serve; use `fedlesion simulate` for simulations.")
    if (str(ipaddress.ip_address(config.host)), int(config.port)) != control:
        raise ValueError("--host and --port are set by fedlesion superlink (--control-address); leave them out.")
    enabled = [name for name in LEGACY_GRPC_VARIABLES if os.environ.get(name) == "1"]
    if enabled:
        raise ValueError(f"unset {', '.join(enabled)}: Flower would start a legacy gRPC API on its own address, "
                         "outside the Fleet-only filter.")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def serve(fleet_address: str, control_address: str, flower_args: Sequence[str]) -> None:
    """Run the SuperLink (blocks until SIGINT/SIGTERM).

    Args:
        fleet_address: ``IP:port`` the hospitals' SuperNodes connect to (e.g. ``0.0.0.0:9092``).
        control_address: ``IP:port`` for ``flwr`` and the ServerApp (e.g. ``127.0.0.1:9093``);
            everything Flower serves answers here.
        flower_args: the other ``flower-superlink`` options (TLS files, ``--enable-supernode-auth``,
            ``--database``, ...), passed to Flower's own parser.

    Raises:
        ValueError: for a bad address, the same port twice, a control address open to all, or a
            Flower configuration :func:`check_flower_config` refuses; all before anything listens.
    """
    fleet = parse_address(fleet_address, "--fleet-address")
    control = parse_address(control_address, "--control-address")
    if fleet[1] == control[1]:
        raise ValueError(f"--fleet-address and --control-address need different ports (both are {fleet[1]}).")
    if ipaddress.ip_address(control[0]).is_unspecified:
        raise ValueError(f"--control-address {control_address} would accept anyone's flwr commands: bind it to "
                         "127.0.0.1 (or one internal address only operators reach).")

    import importlib

    import uvicorn  # Flower's own dependencies; imported here so `--help` stays fast
    from flwr.superlink.main import create_app
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    # The module, not the function of the same name that flwr.superlink.cli exports.
    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")

    # Flower's parser and lifespan, so every flower-superlink option means what Flower documents. The
    # Runtime API address the SuperExec (which runs the ServerApp) connects to is the control address.
    argv = sys.argv
    sys.argv = ["flower-superlink", *flower_args, "--host", control[0], "--port", str(control[1])]
    try:
        config = flower._parse_superlink_lifespan_config()  # noqa: SLF001 - Flower's own CLI parsing, unchanged
    finally:
        sys.argv = argv
    check_flower_config(config, control)
    app = create_app(config, flower.SuperLinkLifespan)
    app.add_middleware(FleetOnlyOnPublicAddress, control_port=control[1])  # outermost: before Flower's middleware
    sockets = [_listen(*control), _listen(*fleet)]
    server = uvicorn.Server(uvicorn.Config(
        app=app, host=control[0], port=control[1], access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
    ))
    print(f"fedlesion superlink: Fleet API (hospitals) on {fleet[0]}:{fleet[1]}; Control and Runtime APIs "
          f"on {control[0]}:{control[1]} only", flush=True)
    server.run(sockets=sockets)
