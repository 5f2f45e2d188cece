"""Toxiproxy's HTTP API (scripts/toxiproxy.sh, `make toxiproxy`), standard library only.

The broker's PROXIED listener (127.0.0.1:9094) advertises 127.0.0.1:9095, where the proxy
"kafka" listens: a client bootstrapping at PROXIED_BOOTSTRAP reaches the broker only through
the proxy, every connection of it (coordinator, fetches), so a test cuts or slows them all:

    async def test_link_cut(pipeline, kafka_proxy):
        pipeline.extra_env["COUPON_BROKER"] = f"kafka://{PROXIED_BOOTSTRAP}"  # workers only
        ...
        with kafka_proxy.cut():           # bytes dropped both ways, connections stay open
            await asyncio.sleep(30)
        # removing the toxic closed the connections it held; clients reconnect

What each fault does (toxiproxy 2.5.0):
  cut()         `timeout` toxic, timeout 0, both directions: every byte is dropped, nothing
                is closed, new connections are accepted and get nothing either. Removing it
                closes the connections it held (the bytes are lost, so the Kafka streams
                could not go on anyway).
  hold()        `latency` toxic of an hour: nothing arrives, but nothing is lost; removing
                it delivers what was held, in order, on the same connections.
  latency(ms)   every chunk delayed by ms (± jitter).
  reset_peer()  `reset_peer` toxic: a connection is closed at the next bytes sent on it
                (timeout_ms later), new ones as soon as they send.
  disabled()    the proxy closes every connection and stops listening: connection refused.
The test's own clients (pipeline.admin, the lag checks) stay on 127.0.0.1:9092.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

API = "http://127.0.0.1:8474"
# The proxy "kafka": clients bootstrap here; the broker's PROXIED listener is its upstream.
PROXIED_BOOTSTRAP = "127.0.0.1:9095"
KAFKA_PROXIED_LISTENER = "127.0.0.1:9094"
# The proxy "mysql" (made by the first test that asks for it): MariaDB through toxiproxy.
MYSQL_PROXY = "127.0.0.1:3316"  # 3307 is the TLS-only MariaDB of scripts/secure.sh
MYSQL_DIRECT = "127.0.0.1:3306"

STREAMS = ("upstream", "downstream")  # client -> server, server -> client
REMOVE_TIMEOUT = 60.0  # seconds a toxic's removal may take (`remove_toxic`)


class ToxiproxyError(RuntimeError):
    pass


class Toxiproxy:
    """The API of one toxiproxy server."""

    def __init__(self, api: str = API, timeout: float = 5.0) -> None:
        self.api = api.rstrip("/")
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: object = None, timeout: float | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.api + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ToxiproxyError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        except OSError as exc:
            raise ToxiproxyError(f"{method} {path}: {exc!r}") from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def version(self) -> str:
        return str(self.request("GET", "/version"))

    def problems(self) -> list[str]:
        """Why the proxy "kafka" cannot work here (nothing when it can)."""
        problems = []
        try:
            self.version()
        except ToxiproxyError as exc:
            problems.append(f"toxiproxy API at {self.api}: {exc}")
        host, port = KAFKA_PROXIED_LISTENER.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError as exc:
            problems.append(
                f"Kafka's PROXIED listener {KAFKA_PROXIED_LISTENER}: {exc!r}"
                " (a broker started with an older infra/kafka/server.properties? `make up`)"
            )
        return problems

    def proxies(self) -> dict[str, Any]:
        return dict(self.request("GET", "/proxies"))

    def proxy(self, name: str, listen: str, upstream: str) -> Proxy:
        """The proxy `name` from listen to upstream, enabled and without toxics, made or
        (when it exists with other addresses) made again."""
        existing = self.proxies().get(name)
        if existing and (existing["listen"], existing["upstream"]) != (listen, upstream):
            self.request("DELETE", f"/proxies/{name}")
            existing = None
        if not existing:
            self.request(
                "POST",
                "/proxies",
                {"name": name, "listen": listen, "upstream": upstream, "enabled": True},
            )
        proxy = Proxy(self, name, listen, upstream)
        proxy.reset()
        return proxy

    def kafka(self) -> Proxy:
        """The proxy "kafka": PROXIED_BOOTSTRAP -> the broker's PROXIED listener."""
        return self.proxy("kafka", PROXIED_BOOTSTRAP, KAFKA_PROXIED_LISTENER)

    def mysql(self) -> Proxy:
        """The proxy "mysql": MYSQL_PROXY -> MariaDB."""
        return self.proxy("mysql", MYSQL_PROXY, MYSQL_DIRECT)

    def reset_all(self) -> None:
        """Every proxy enabled, every toxic gone (POST /reset)."""
        self.request("POST", "/reset")


@dataclass
class Proxy:
    client: Toxiproxy
    name: str
    listen: str
    upstream: str

    @property
    def path(self) -> str:
        return f"/proxies/{self.name}"

    # -- the proxy -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return dict(self.client.request("GET", self.path))

    @property
    def enabled(self) -> bool:
        return bool(self.state()["enabled"])

    def enable(self) -> None:
        self.client.request("POST", self.path, {"enabled": True})

    def disable(self) -> None:
        """Closes every connection through the proxy and stops listening."""
        self.client.request("POST", self.path, {"enabled": False})

    def reset(self) -> None:
        """Enabled, without toxics."""
        self.enable()
        self.remove_toxics()

    # -- toxics --------------------------------------------------------------------------

    def toxics(self) -> list[dict[str, Any]]:
        return list(self.client.request("GET", f"{self.path}/toxics") or [])

    def add_toxic(
        self,
        kind: str,
        stream: str = "downstream",
        *,
        name: str | None = None,
        toxicity: float = 1.0,
        **attributes: float,
    ) -> str:
        """Adds a toxic of type `kind` on one direction; returns its name (default:
        kind_stream). attributes: the toxic's, e.g. latency=ms, timeout=ms."""
        return self._add_toxic(kind, stream, name, toxicity, attributes)

    def _add_toxic(
        self,
        kind: str,
        stream: str,
        name: str | None,
        toxicity: float,
        attributes: dict[str, float],
    ) -> str:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        name = name or f"{kind}_{stream}"
        self.client.request(
            "POST",
            f"{self.path}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
        )
        return name

    def remove_toxic(self, name: str) -> None:
        # Removing a hold delivers what every link through the proxy held; clients that kept
        # reconnecting during it left many links, so this can take longer than a request.
        self.client.request("DELETE", f"{self.path}/toxics/{name}", timeout=REMOVE_TIMEOUT)

    def remove_toxics(self) -> None:
        for toxic in self.toxics():
            self.remove_toxic(toxic["name"])

    @contextmanager
    def toxic(
        self, kind: str, stream: str = "both", toxicity: float = 1.0, **attributes: float
    ) -> Iterator[list[str]]:
        """A toxic of type `kind` on `stream` ("upstream", "downstream" or "both") inside
        the block; yields the toxics' names."""
        names: list[str] = []
        try:
            for s in STREAMS if stream == "both" else (stream,):
                names.append(self._add_toxic(kind, s, None, toxicity, attributes))
            yield names
        finally:
            for name in names:
                self.remove_toxic(name)

    # -- faults --------------------------------------------------------------------------

    def cut(self, stream: str = "both") -> AbstractContextManager[list[str]]:
        """Drops every byte (connections stay open); leaving closes the connections held."""
        return self.toxic("timeout", stream, timeout=0)

    def hold(self, stream: str = "both") -> AbstractContextManager[list[str]]:
        """Nothing arrives, nothing is lost; leaving delivers what was held."""
        return self.toxic("latency", stream, latency=3_600_000)

    def latency(
        self, ms: int, jitter: int = 0, stream: str = "both"
    ) -> AbstractContextManager[list[str]]:
        return self.toxic("latency", stream, latency=ms, jitter=jitter)

    def reset_peer(
        self, timeout_ms: int = 0, stream: str = "both"
    ) -> AbstractContextManager[list[str]]:
        """Resets each connection at its next bytes (after timeout_ms more), new ones too."""
        return self.toxic("reset_peer", stream, timeout=timeout_ms)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The proxy down inside the block: connections closed, new ones refused."""
        self.disable()
        try:
            yield
        finally:
            self.enable()
