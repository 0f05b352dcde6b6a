"""The SSRF guard for URLs registered through the subscription API (SPEC §3).

Anyone holding an API key can make the workers POST to a URL of their choosing, so such URLs
are untrusted: http(s) only, no user-info, at most 2,048 characters, and every address the host
resolves to must be public unless it lies in ``RELAY_ALLOWED_NETWORKS``.

Checked twice:

* at registration, :meth:`AddressGuard.check_url` parses the URL with the same parser the
  delivery uses (urllib3), reads IP literals the way the C resolver does (``127.1``,
  ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1`` are all loopback) and resolves host names;
* at every delivery, the connections of :meth:`AddressGuard.pool_manager` resolve and check the
  host again and then check the address they actually connected to (``getpeername``) before a
  single byte (not even a TLS ClientHello) is sent, which defeats DNS rebinding.

Refusals raise :class:`relay.core.errors.UnsafeURLError`, a permanent delivery error.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from relay.core.errors import ConfigError, UnsafeURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
ALLOWED_NETWORKS_ENV = "RELAY_ALLOWED_NETWORKS"

# Refused whatever ``is_global`` says, each with the reason shown to the user. Several overlap
# with ipaddress' own tables on purpose: those tables change between Python releases.
_REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local / cloud metadata"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b::/96", "NAT64"),
        ("64:ff9b:1::/48", "NAT64 (local use)"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001:2::/48", "benchmarking"),
        ("2001:10::/28", "ORCHID"),
        ("2001:20::/28", "ORCHIDv2"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")

# inet_aton() accepts 1 to 4 dot-separated parts, each decimal, octal (leading 0) or hex (0x).
_LEGACY_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")
# Characters on which URL parsers disagree; a URL containing them is refused outright.
_AMBIGUOUS = re.compile(r"[\x00-\x20\x7f\\]")


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` as the C resolver's ``inet_aton`` would, or ``None`` if it is no IPv4
    literal: ``127.1``, ``2130706433``, ``0x7f.0.0.1`` and ``0177.0.0.1`` are 127.0.0.1."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_LEGACY_PART.fullmatch(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            if not set(part) <= set("01234567"):
                return None  # "08" is neither octal nor decimal for inet_aton
            values.append(int(part, 8))
        else:
            values.append(int(part))
    # The last part fills all the bytes the earlier parts did not take.
    last_bits = 8 * (5 - len(values))
    if any(v > 0xFF for v in values[:-1]) or values[-1] >= 1 << last_bits:
        return None
    number = 0
    for value in values[:-1]:
        number = number << 8 | value
    return ipaddress.IPv4Address(number << last_bits | values[-1])


def parse_ip_literal(host: str) -> IPAddress | None:
    """An IPv6 literal (brackets and zone allowed) or a legacy IPv4 spelling, else ``None``."""
    bare = host.strip("[]")
    if ":" in bare:
        try:
            return ipaddress.IPv6Address(bare.split("%", 1)[0])
        except ValueError:
            return None
    # A trailing dot makes no difference to a literal for most resolvers; read it strictly.
    return parse_legacy_ipv4(bare[:-1] if bare.endswith(".") else bare)


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not public, or ``None`` when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            reason = refusal_reason(address.ipv4_mapped)
            return f"IPv4-mapped {reason}" if reason else None
        if address in _SIXTOFOUR and address.sixtofour is not None:
            reason = refusal_reason(address.sixtofour)
            if reason:
                return f"6to4 wrapping a {reason}"
    for network, reason in _REFUSED_NETWORKS:
        if address in network:
            return reason
    if not address.is_global:
        return "non-public"
    return None


def _default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _is_localhost_name(host: str) -> bool:
    # RFC 6761: these names are loopback whatever a DNS server might claim.
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class AddressGuard:
    """Decides which URLs and addresses API-registered hooks may reach.

    ``allowed_networks`` (CIDRs) are let through even though they are not public; tests use
    ``["127.0.0.0/8"]``. ``resolver(host, port)`` returns the addresses of a host name; the
    default asks ``socket.getaddrinfo`` and tests pass a fake one.
    """

    def __init__(
        self, allowed_networks: Sequence[str] = (), resolver: Resolver | None = None
    ) -> None:
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(_parse_networks(allowed_networks))
        self._resolver = resolver or _default_resolver

    @classmethod
    def from_env(cls, value: str | None) -> AddressGuard:
        """Build from the comma-separated value of ``RELAY_ALLOWED_NETWORKS`` (may be unset)."""
        return cls([item.strip() for item in (value or "").split(",") if item.strip()])

    # -- addresses -------------------------------------------------------------------------

    def is_allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack socket reaches ::ffff:a.b.c.d at a.b.c.d: judge that address.
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed_networks):
            return True
        return refusal_reason(address) is None

    def check_address(self, ip: str) -> None:
        """Refuse a connected (or resolved) address that is neither public nor allowed."""
        self._check(ip, what=ip)

    def _check(self, ip: str, what: str) -> None:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            raise UnsafeURLError(f"{what}: {ip!r} is not an IP address") from None
        if self.is_allowed(address):
            return
        effective = address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            effective = address.ipv4_mapped
        if parse_ip_literal(what) == address:
            # An IP literal in the URL: show the address it really is if spelled oddly.
            shown = what if what == str(effective) else f"{what} (that is {effective})"
        else:
            shown = f"{what} resolves to {ip}, which"
        raise UnsafeURLError(
            f"{shown} is a {refusal_reason(effective)} address; "
            "webhook URLs must point to a public address"
        )

    # -- URLs -------------------------------------------------------------------------------

    def check_url(self, url: str, resolve: bool = True) -> None:
        """Refuse a URL an API client wants to register; the message is meant for that client.

        With ``resolve=False`` only the URL itself is judged (no DNS query is made)."""
        host, port = self._parse(url)
        literal = parse_ip_literal(host)
        if literal is not None:
            self._check(str(literal), what=host)
            if not host.endswith("."):
                return
            # "8.8.8.8." is no literal for the C resolver but a name to look up: do that too.
        if _is_localhost_name(host) and not self.is_allowed(ipaddress.IPv4Address("127.0.0.1")):
            raise UnsafeURLError(
                f"{host} is a loopback name; webhook URLs must point to a public address"
            )
        if resolve:
            self.check_host(host, port)

    def check_host(self, host: str, port: int, *, lenient: bool = False) -> None:
        """Resolve ``host`` and refuse it unless *every* address is allowed.

        ``lenient`` lets a failed lookup pass silently: at delivery time the connection's own
        lookup then fails too and that is a retryable error, not a refusal."""
        try:
            addresses = self._resolver(host, port)
        except (OSError, UnicodeError) as exc:
            if lenient:
                return
            raise UnsafeURLError(f"cannot resolve host {host!r}: {exc}") from exc
        if not addresses and not lenient:
            raise UnsafeURLError(f"host {host!r} has no address")
        for ip in addresses:
            self._check(ip, what=host)

    def _parse(self, url: str) -> tuple[str, int]:
        if len(url) > MAX_URL_LENGTH:
            raise UnsafeURLError(f"URL is longer than {MAX_URL_LENGTH} characters")
        if _AMBIGUOUS.search(url):
            raise UnsafeURLError("URL must not contain spaces, control characters or '\\'")
        try:
            split = urlsplit(url)
            split_host = split.hostname
            parsed = parse_url(url)
        except (ValueError, LocationParseError) as exc:
            raise UnsafeURLError(f"URL cannot be parsed: {exc}") from None
        scheme = (parsed.scheme or "").lower()
        if scheme not in ("http", "https"):
            raise UnsafeURLError("URL must start with http:// or https://")
        if "@" in split.netloc or parsed.auth is not None:
            raise UnsafeURLError("URL must not contain credentials (user-info)")
        if "%" in split.netloc:
            raise UnsafeURLError("URL host must not be percent-encoded")
        host = (parsed.host or "").strip("[]")
        if not host:
            raise UnsafeURLError("URL has no host")
        # The registration check and the delivery must be talking about the same host.
        if (split_host or "").lower() != host.lower():
            raise UnsafeURLError("URL host is ambiguous")
        return host, parsed.port or (443 if scheme == "https" else 80)

    # -- delivery ---------------------------------------------------------------------------

    def pool_manager(self, **kwargs: Any) -> urllib3.PoolManager:
        """A ``PoolManager`` whose connections refuse non-public peers before sending.

        Certificates stay verified against the URL's host name (urllib3's defaults); extra
        ``kwargs`` go to ``PoolManager``."""
        guard = self
        http_conn = type("GuardedHTTPConnection", (_GuardedHTTPConnection,), {"guard": guard})
        https_conn = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
        manager = urllib3.PoolManager(**kwargs)
        manager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type(
                "GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}
            ),
        }
        return manager


def _parse_networks(values: Iterable[str]) -> Iterable[IPNetwork]:
    for value in values:
        try:
            yield ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"{ALLOWED_NETWORKS_ENV}: {value!r} is not a network (CIDR like 10.0.0.0/8)"
            ) from None


class _GuardMixin:
    """Runs inside urllib3's ``connect()``: for HTTPS, before the TLS handshake."""

    guard: AddressGuard
    _dns_host: str
    port: int

    def _new_conn(self) -> socket.socket:
        self.guard.check_host(self._dns_host.strip("[]"), self.port, lenient=True)
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        try:
            # The lookup urllib3 just made may differ from ours (DNS rebinding): what counts
            # is the address we are connected to.
            self.guard._check(str(sock.getpeername()[0]), what=self._dns_host.strip("[]"))
        except BaseException:
            sock.close()
            raise
        return sock


class _GuardedHTTPConnection(_GuardMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardMixin, HTTPSConnection):
    pass
