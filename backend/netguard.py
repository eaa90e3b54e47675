"""Outbound HTTP for task images: where a connection may go, and how long a download may take.

requests checks neither: a URL naming a private address reaches it, a redirect can point
anywhere, and its timeouts apply per socket operation, so a host that drips one byte a second
never times out. The guard sits where the socket is made (urllib3's `_new_conn`), so every
connection, every redirect hop and every retry passes it, and the address it checked is the
one it connects to (no DNS rebinding between the check and the connect). The same place ties
each socket to the download's one wall-clock deadline, which shuts the socket when it passes.
(advocate did this for urllib3 1.x; it is unmaintained and does not run on urllib3 2.)
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import FrozenSet, Iterator, List, NamedTuple, Optional, Union

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import Retry, connection

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
ALLOW_PRIVATE_SETTING = "RFCLIP_ALLOW_PRIVATE_URLS"
# IPv6 prefixes that carry an IPv4 address a translator reaches (an IPv6-only cloud subnet's NAT64
# gateway reaches the private IPv4 addresses of its network): the well-known prefix holds it in
# its last 32 bits (RFC 6052); the local-use one is private in itself (RFC 8215), which Python's
# ipaddress says only from 3.12.4 / 3.11.10 on
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
# A busy host (Label Studio's own server on a loaded machine) now and then drops a connection or
# answers 502-504; a GET is tried again, twice at most, inside the same wall-clock deadline.
TRANSIENT_RETRIES = Retry(total=2, connect=2, read=2, status=2, other=0, redirect=False,
                          status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET"}),
                          backoff_factor=0.25, raise_on_status=False)


class Failure(NamedTuple):
    """A GET that failed: its URL, its HTTP status (None: no answer, or one refused), and a
    short reason ("HTTP 404", "ConnectionError", what a refusal said)."""

    url: str
    status: Optional[int]
    reason: str


class DownloadRefused(Exception):
    """A download that must not happen or go on; the message says why (and holds no secret)."""


class DestinationRefused(DownloadRefused):
    """A URL resolves to an address the backend must not connect to."""


class DeadlinePassed(DownloadRefused):
    """A download ran past its one wall-clock deadline."""


class TooLarge(DownloadRefused):
    """A download is larger than the byte limit."""


@dataclass(frozen=True)
class DestinationPolicy:
    """Link-local addresses (cloud metadata) are never reached; loopback and private ones only
    when the operator allows them, or for the operator's own Label Studio host."""

    allow_private: bool = False
    trusted_hosts: FrozenSet[str] = frozenset()

    def check(self, host: str, address: Address) -> None:
        reached = reached_ipv4(address)
        resolves = f"{host} resolves to " + ("" if reached == address else f"{address}, which reaches ")
        if reached.is_link_local:
            raise DestinationRefused(f"{resolves}the link-local address {reached}, which is never fetched (cloud "
                                     "metadata lives there)")
        if reached.is_global and not reached.is_multicast and reached not in NAT64_LOCAL_USE:
            return
        if self.allow_private or host.lower().strip("[]") in self.trusted_hosts:
            return
        raise DestinationRefused(f"{resolves}the private or loopback address {reached}; set "
                                 f"{ALLOW_PRIVATE_SETTING}=true to fetch images from private networks")

    def addresses(self, host: str, port: int) -> List[str]:
        """The resolved addresses of `host` that may be connected to; raises DestinationRefused
        when there is none."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed, refusal = [], None
        for *_, sockaddr in infos:
            ip = sockaddr[0]
            try:
                self.check(host, ipaddress.ip_address(ip.split("%", 1)[0]))
            except DestinationRefused as err:
                refusal = err
                continue
            if ip not in allowed:
                allowed.append(ip)
        if not allowed:
            raise refusal or DestinationRefused(f"{host} resolves to no address")
        return allowed


def reached_ipv4(address: Address) -> Address:
    """The IPv4 address that an IPv4-mapped, NAT64 (well-known prefix) or 6to4 IPv6 address
    reaches, which is the one to judge; any other address as it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


class Deadline:
    """One wall-clock limit for everything a download does: when it passes, every socket
    opened for it is shut down, which ends any blocking read at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.passed = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            passed = self.passed
        if passed:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _GuardedConnectionMixin:
    """urllib3's connection, connecting only to addresses the policy allows, within the deadline."""

    policy: DestinationPolicy
    state: threading.local

    def _new_conn(self) -> socket.socket:
        deadline: Optional[Deadline] = getattr(self.state, "deadline", None)
        if deadline is not None and deadline.remaining() <= 0:
            raise DeadlinePassed(f"download took longer than {deadline.seconds:g} s")
        try:
            addresses = self.policy.addresses(self._dns_host, self.port)
        except socket.gaierror as err:
            raise NameResolutionError(self.host, self, err) from err
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, deadline.remaining()) if isinstance(timeout, (int, float)) else deadline.remaining()
        last_error: Optional[OSError] = None
        for ip in addresses:
            try:
                sock = connection.create_connection((ip, self.port), timeout, source_address=self.source_address,
                                                    socket_options=self.socket_options)
            except socket.timeout as err:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from err
            except OSError as err:
                last_error = err
                continue
            if deadline is not None:
                deadline.watch(sock)
            return sock
        raise NewConnectionError(self, f"Failed to establish a new connection: {last_error}")


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools make guarded connections."""

    def __init__(self, policy: DestinationPolicy, state: threading.local) -> None:
        attrs = {"policy": policy, "state": state}
        http = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), attrs)
        https = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), attrs)
        self._pools = {"http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
                       "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https})}
        super().__init__(max_retries=TRANSIENT_RETRIES)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


class GuardedSession(requests.Session):
    """A requests session whose GETs reach only allowed destinations, stop at a byte limit,
    and end, connect to last byte, within one wall-clock deadline (the SDK reads `.content`)."""

    def __init__(self, policy: DestinationPolicy, max_bytes: int, timeout_s: float) -> None:
        super().__init__()
        self.trust_env = False  # no proxy or .netrc from the environment: the guard checks real destinations
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._state = threading.local()
        adapter = GuardedAdapter(policy, self._state)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    @contextmanager
    def _deadline(self) -> Iterator[Deadline]:
        deadline = Deadline(self.timeout_s)
        self._state.deadline = deadline
        try:
            yield deadline
        finally:
            self._state.deadline = None
            deadline.cancel()

    def last_failure(self) -> Optional["Failure"]:
        """What went wrong with this thread's latest GET, None when it succeeded: a caller's own
        fallback request may fail otherwise than the error that caller reports."""
        return getattr(self._state, "failure", None)

    def get(self, url, **kwargs):  # type: ignore[override]
        self._state.failure = None
        try:
            response = self._get(url, **kwargs)
        except Exception as err:
            self._state.failure = Failure(url, None, str(err) if isinstance(err, DownloadRefused)
                                          else type(err).__name__)
            raise
        if not response.ok:
            self._state.failure = Failure(url, response.status_code, f"HTTP {response.status_code}")
        return response

    def _get(self, url, **kwargs):
        kwargs["stream"] = True
        kwargs["timeout"] = (min(5.0, self.timeout_s), self.timeout_s)
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Connection"] = "close"  # a fresh socket per download, so the deadline watches it
        with self._deadline() as deadline:
            try:
                response = super().get(url, headers=headers, **kwargs)
                body = self._read(response, deadline)
                if deadline.passed:  # a socket shut mid-headers can read as a short, "complete" answer
                    raise DeadlinePassed(f"download took longer than {self.timeout_s:g} s")
            except DownloadRefused:
                raise
            except Exception:
                if deadline.passed:
                    raise DeadlinePassed(f"download took longer than {self.timeout_s:g} s") from None
                raise
        response._content = body
        response._content_consumed = True
        return response

    def _read(self, response: requests.Response, deadline: Deadline) -> bytes:
        try:
            declared = int(response.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_bytes:
                raise TooLarge(f"image is {declared} bytes, more than the limit of {self.max_bytes}")
            body = bytearray()
            while True:
                chunk = response.raw.read1(1 << 16, decode_content=True)
                if deadline.passed:  # before copying what a fast endless host sent in the meantime
                    raise DeadlinePassed(f"download took longer than {self.timeout_s:g} s")
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > self.max_bytes:
                    raise TooLarge(f"image is larger than the download limit of {self.max_bytes} bytes")
        finally:
            response.close()
