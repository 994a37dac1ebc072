"""HTTPS listeners (TLS 1.2 minimum) and websocket tunnelling, end to end."""

from __future__ import annotations

import json
import socket
import ssl
import warnings
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from .conftest import Launcher, Node, RawClient

WS_DEADLINE = 10.0


class Env:
    def __init__(self, node: Node, ca: trustme.CA) -> None:
        self.node = node
        self.ca = ca
        self.http_port = node.ports["web"][0]
        self.https_port = node.ports["web"][1]

    def client_context(self, *, minimum: ssl.TLSVersion | None = None,
                       maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:  # fmt: skip
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if minimum is not None or maximum is not None:
            # Let this client offer old protocol versions, so that a refusal
            # is the server's, not the client library's.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            if minimum is not None:
                ctx.minimum_version = minimum
            if maximum is not None:
                ctx.maximum_version = maximum
        return ctx

    def tls_client(self, ctx: ssl.SSLContext) -> RawClient:
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=10)
        try:
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        client = RawClient(self.https_port, sock=sock)
        client.host = "localhost"
        return client


@pytest.fixture(scope="module")
def env(module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Env:
    certs: Path = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(certs / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(certs / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        with open(certs / "cert.pem", "ab") as f:
            f.write(extra.bytes())
    a = module_launcher.backend("a")
    config = {
        "load_balancers": [
            {
                "name": "web",
                "listeners": [
                    {"protocol": "http", "port": 0},
                    {"protocol": "https", "port": 0, "ssl": {
                        "certificate": str(certs / "cert.pem"),
                        "private_key": str(certs / "key.pem")}},
                ],
                "targets": [{"id": "a", "address": a.address}],
            }
        ]
    }  # fmt: skip
    return Env(module_launcher.node(config), ca)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_https_terminates_tls(env: Env, version: ssl.TLSVersion) -> None:
    ctx = env.client_context(minimum=version, maximum=version)
    with env.tls_client(ctx) as c:
        assert c.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        for _ in range(2):  # keep-alive inside one TLS session
            resp = c.get("/headers")
            assert resp.status == 200
            seen = {k.lower(): v for k, v in resp.json()["headers"]}
            assert seen["x-forwarded-proto"] == "https"
            assert seen["host"] == "localhost"


def test_https_offers_http11_by_alpn(env: Env) -> None:
    ctx = env.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with env.tls_client(ctx) as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        assert c.get("/").status == 200


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["TLSv1.0", "TLSv1.1"])
def test_tls_below_12_is_refused(env: Env, version: ssl.TLSVersion) -> None:
    ctx = env.client_context(minimum=ssl.TLSVersion.TLSv1, maximum=version)
    with pytest.raises(ssl.SSLError) as info:
        env.tls_client(ctx).close()
    # The client did offer the version (the same client settings get TLS 1.2
    # above): the server refused it, by an alert or by closing.
    assert "no protocols available" not in str(info.value)
    assert "certificate" not in str(info.value)


def test_plain_http_on_the_https_port_fails_cleanly(env: Env) -> None:
    with RawClient(env.https_port, timeout=5.0) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = c.read_until_close()
    assert b"HTTP/1.1 200" not in data
    # The node is fine afterwards.
    with env.tls_client(env.client_context()) as c:
        assert c.get("/").status == 200


# -- websockets ---------------------------------------------------------------------------------


async def _echo_session(url: str, ctx: ssl.SSLContext | None = None) -> None:
    with trio.fail_after(WS_DEADLINE):
        async with open_websocket_url(url, ssl_context=ctx) as ws:
            for i in range(5):
                await ws.send_message(f"message {i}")
                assert await ws.get_message() == f"message {i}"
            blob = bytes(range(256)) * 800  # 200 KiB, several frames' worth of TCP
            await ws.send_message(blob)
            assert await ws.get_message() == blob
            await ws.send_message(json.dumps({"last": True}))
            assert json.loads(await ws.get_message()) == {"last": True}


async def test_websocket_is_tunnelled(env: Env) -> None:
    await _echo_session(f"ws://127.0.0.1:{env.http_port}/ws")


async def test_websocket_over_tls(env: Env) -> None:
    await _echo_session(f"wss://localhost:{env.https_port}/ws", env.client_context())


def test_upgrade_handshake_headers(env: Env) -> None:
    with RawClient(env.http_port) as c:
        c.send(c.request_bytes("GET", "/ws", [
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]))  # fmt: skip
        resp = c.read_head()
        assert resp.status == 101
        assert resp.header("upgrade") == "websocket"
        assert "upgrade" in (resp.header("connection") or "").lower()
        assert resp.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        # A masked text frame "hi" (RFC 6455 5.7), echoed back unmasked.
        c.send(bytes([0x81, 0x82, 1, 2, 3, 4, ord("h") ^ 1, ord("i") ^ 2]))
        while len(c.buf) < 4:
            assert c._fill()
        assert bytes(c.buf[:4]) == b"\x81\x02hi"


def test_upgrade_refused_by_the_backend_is_a_normal_response(env: Env) -> None:
    with RawClient(env.http_port) as c:
        resp = c.request("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket")])
        assert resp.status == 426  # no Sec-WebSocket-Key: the backend says no
        assert c.get("/").status == 200
