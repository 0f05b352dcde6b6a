"""The SSRF guard: URL checks at registration, address checks at every delivery.

No test here sends a packet: refusals use IP literals or a fake resolver. The checks on a real
connection (a raw TCP server on 127.0.0.1): tests/integration/test_netguard.py.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.errors import ConfigError, UnsafeURLError
from relay.drivers import ssrf_guard as netguard
from relay.drivers.ssrf_guard import AddressGuard, parse_legacy_ipv4, refusal_reason

PUBLIC_V4 = "93.184.216.34"  # never contacted: only returned by fake resolvers


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"unexpected DNS query for {host!r}")


def resolving_to(*addresses: str) -> netguard.Resolver:
    return lambda host, port: list(addresses)


# -- registration: URL shape -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://example.com/", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http://user:secret@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://@example.com/", "credentials"),
        ("http://a@b@example.com/", "credentials"),
        ("http://example.com\\@127.0.0.1/", "'\\'"),
        ("http://exa mple.com/", "spaces"),
        ("http://example.com/\r\nX-Injected: 1", "control"),
        ("http://%31%32%37.0.0.1/", "percent-encoded"),
        ("http://[fe80::1%25eth0]/", "percent-encoded"),
        ("http:///path", "no host"),
        ("http://:8080/", "no host"),
        ("http://example.com:99999/", "cannot be parsed"),
        ("https://example.com/" + "a" * 2030, "2048"),
    ],
)
def test_malformed_or_unsafe_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(UnsafeURLError) as info:
        AddressGuard(resolver=no_dns).check_url(url)
    assert message in str(info.value)


def test_a_url_of_exactly_2048_characters_is_accepted() -> None:
    url = "https://example.com/" + "a" * (2048 - len("https://example.com/"))
    assert len(url) == 2048
    AddressGuard(resolver=resolving_to(PUBLIC_V4)).check_url(url)


# -- registration: addresses, refused before any DNS query ----------------------------------

REFUSED_HOSTS = [
    # loopback in every spelling
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0x7f.1",
    "0177.0.0.1", "0177.1", "017700000001", "127.0.0.1.", "[::1]", "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "localhost", "localhost.", "LOCALHOST",
    "api.localhost",
    # this network / unspecified
    "0.0.0.0", "0", "0x0", "[::]",
    # RFC 1918, CGNAT, link-local and cloud metadata
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1",
    "3232235777", "0xc0.0xa8.1.1", "100.64.0.1", "100.127.255.254", "169.254.169.254",
    "0xa9fea9fe", "[::ffff:169.254.169.254]", "[fe80::1]",
    # multicast, reserved, broadcast, benchmarking, documentation
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "198.18.0.1",
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "192.0.0.8", "[ff02::1]", "[2001:db8::1]",
    # IPv6: ULA, site-local, NAT64, 6to4 around private v4, Teredo, IPv4-compatible
    "[fc00::1]", "[fd12:3456:789a::1]", "[fec0::1]", "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b::808:808]", "[64:ff9b:1::1]", "[2002:7f00:1::]", "[2002:c0a8:101::1]",
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[::127.0.0.1]", "[100::1]",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_non_public_literals_are_refused_without_a_dns_query(host: str) -> None:
    guard = AddressGuard(resolver=no_dns)
    for scheme in ("http", "https"):
        with pytest.raises(UnsafeURLError, match="public address"):
            guard.check_url(f"{scheme}://{host}:8080/hook")
        with pytest.raises(UnsafeURLError):
            guard.check_url(f"{scheme}://{host}/hook", resolve=False)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "1.1.1.1", "134744072", "0x8.0x8.0x8.0x8", "[2606:4700:4700::1111]",
             "[::ffff:8.8.8.8]", "[2002:808:808::1]"],
)
def test_public_literals_pass_without_a_dns_query(host: str) -> None:
    AddressGuard(resolver=no_dns).check_url(f"https://{host}/hook")


def test_a_literal_with_a_trailing_dot_is_also_looked_up_as_a_name() -> None:
    AddressGuard(resolver=resolving_to(PUBLIC_V4)).check_url("http://8.8.8.8./")
    with pytest.raises(UnsafeURLError, match="8.8.8.8. resolves to 10.0.0.1"):
        AddressGuard(resolver=resolving_to("10.0.0.1")).check_url("http://8.8.8.8./")


def test_the_message_names_what_the_odd_spelling_really_is() -> None:
    with pytest.raises(UnsafeURLError) as info:
        AddressGuard().check_url("http://0x7f.1/")
    assert str(info.value).startswith("0x7f.1 (that is 127.0.0.1) is a loopback address")


# -- registration: host names ----------------------------------------------------------------

@pytest.mark.parametrize(
    "addresses",
    [["10.0.0.5"], [PUBLIC_V4, "127.0.0.1"], ["2606:4700::1", "fd00::1"], ["::ffff:10.1.2.3"],
     ["169.254.169.254"]],
)
def test_a_host_name_is_refused_when_any_address_is_not_public(addresses: list[str]) -> None:
    guard = AddressGuard(resolver=resolving_to(*addresses))
    with pytest.raises(UnsafeURLError, match="hooks.example.com resolves to"):
        guard.check_url("https://hooks.example.com/x")
    guard.check_url("https://hooks.example.com/x", resolve=False)  # no lookup, no verdict


def test_a_host_name_with_public_addresses_passes() -> None:
    seen: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        seen.append((host, port))
        return [PUBLIC_V4, "2606:4700::6810:85e5"]

    AddressGuard(resolver=resolver).check_url("https://Hooks.Example.com/x")
    AddressGuard(resolver=resolver).check_url("http://hooks.example.com:8080/x")
    assert seen == [("hooks.example.com", 443), ("hooks.example.com", 8080)]


def test_an_unresolvable_or_empty_host_is_refused() -> None:
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UnsafeURLError, match="cannot resolve"):
        AddressGuard(resolver=failing).check_url("https://nowhere.example/")
    with pytest.raises(UnsafeURLError, match="no address"):
        AddressGuard(resolver=resolving_to()).check_url("https://nowhere.example/")


def test_the_default_resolver_uses_getaddrinfo_and_checks_every_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_getaddrinfo(host: str, port: int, *args: object) -> list[tuple[object, ...]]:
        assert host == "rebind.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_V4, port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.0.10", port)),
        ]

    monkeypatch.setattr(netguard.socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UnsafeURLError, match="192.168.0.10"):
        AddressGuard().check_url("http://rebind.example/")


def test_allowed_networks_let_their_addresses_through() -> None:
    guard = AddressGuard(["127.0.0.0/8", "10.1.0.0/16", "fd00::/8"], resolver=no_dns)
    for url in ("http://127.0.0.1:5000/", "http://127.1/", "http://[::ffff:127.0.0.1]/",
                "http://10.1.2.3/", "http://[fd00::5]/"):
        guard.check_url(url)
    guard.check_url("http://localhost:5000/", resolve=False)
    for url in ("http://10.2.0.1/", "http://[::1]/", "http://169.254.169.254/"):
        with pytest.raises(UnsafeURLError):
            guard.check_url(url)


def test_from_env() -> None:
    assert AddressGuard.from_env(None).allowed_networks == ()
    assert AddressGuard.from_env("").allowed_networks == ()
    guard = AddressGuard.from_env(" 127.0.0.0/8, ,10.0.0.0/8,fd00::/8 ")
    assert [str(n) for n in guard.allowed_networks] == ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ConfigError, match="RELAY_ALLOWED_NETWORKS.*'10.0.0.0/33'"):
        AddressGuard.from_env("127.0.0.0/8,10.0.0.0/33")


def test_check_address() -> None:
    guard = AddressGuard(["192.168.5.0/24"])
    guard.check_address(PUBLIC_V4)
    guard.check_address("192.168.5.9")
    for ip in ("127.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0", "not-an-ip"):
        with pytest.raises(UnsafeURLError):
            guard.check_address(ip)


# -- properties ------------------------------------------------------------------------------

PRIVATE_V4 = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)]


@st.composite
def addresses_in(draw: st.DrawFn, networks: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Address:
    network = draw(st.sampled_from(networks))
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network.network_address + offset


def _spell_part(value: int, style: str) -> str:
    spellings = {"dec": str(value), "hex": hex(value), "HEX": f"0X{value:X}", "oct": f"0{value:o}"}
    return spellings[style]


@st.composite
def legacy_spellings(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """``address`` written as inet_aton reads it: 1 to 4 parts, each dec, hex or octal."""
    number = int(address)
    n_parts = draw(st.integers(1, 4))
    widths = [8] * (n_parts - 1) + [8 * (5 - n_parts)]
    values, shift = [], 32
    for width in widths:
        shift -= width
        values.append(number >> shift & ((1 << width) - 1))
    styles = draw(st.lists(st.sampled_from(["dec", "hex", "HEX", "oct"]),
                           min_size=n_parts, max_size=n_parts))
    return ".".join(_spell_part(v, s) for v, s in zip(values, styles, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_spelling_of_a_private_address_is_refused(data: st.DataObject) -> None:
    address = data.draw(addresses_in(PRIVATE_V4))
    host = data.draw(st.one_of(
        legacy_spellings(address),
        st.just(f"[::ffff:{address}]"),
        st.just(f"[::ffff:{int(address) >> 16:x}:{int(address) & 0xFFFF:x}]"),
        st.just(f"[64:ff9b::{address}]"),
        st.just(f"[{ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80))}]"),
    ))
    with pytest.raises(UnsafeURLError):
        AddressGuard(resolver=no_dns).check_url(f"http://{host}/hook")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_legacy_spellings_are_read_like_the_c_resolver(data: st.DataObject) -> None:
    address = data.draw(st.ip_addresses(v=4))
    spelling = data.draw(legacy_spellings(address))
    assert parse_legacy_ipv4(spelling) == address
    assert socket.inet_aton(spelling) == address.packed


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.", max_size=24))
def test_whatever_inet_aton_reads_as_an_address_so_do_we(text: str) -> None:
    try:
        packed = socket.inet_aton(text)
    except OSError:
        return
    assert parse_legacy_ipv4(text) == ipaddress.IPv4Address(packed)


@st.composite
def allowed_setups(draw: st.DrawFn) -> tuple[str, str]:
    """A non-public network to allow and an address inside it."""
    version = draw(st.sampled_from([4, 6]))
    bases = (["10.0.0.0", "172.16.0.0", "192.168.0.0", "127.0.0.0", "100.64.0.0"]
             if version == 4 else ["fd00::", "fe80::", "fc00::"])
    base = ipaddress.ip_address(draw(st.sampled_from(bases)))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(16 if version == 4 else 10, bits))
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    inside = network.network_address + draw(st.integers(0, network.num_addresses - 1))
    return str(network), str(inside)


@settings(max_examples=300, deadline=None)
@given(allowed_setups())
def test_any_address_inside_an_allowed_network_passes(setup: tuple[str, str]) -> None:
    network, inside = setup
    guard = AddressGuard([network], resolver=no_dns)
    guard.check_address(inside)
    host = f"[{inside}]" if ":" in inside else inside
    guard.check_url(f"https://{host}/hook")
    AddressGuard([network], resolver=resolving_to(inside)).check_url("https://a.example/")
    with pytest.raises(UnsafeURLError):
        AddressGuard(resolver=no_dns).check_address(inside)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_an_address_is_allowed_only_if_global_or_in_an_allowed_network(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    guard = AddressGuard(["198.18.0.0/15"])
    allowed = guard.is_allowed(address)
    mapped = getattr(address, "ipv4_mapped", None)
    effective = mapped or address
    if address in ipaddress.ip_network("198.18.0.0/15") or (
        mapped and mapped in ipaddress.ip_network("198.18.0.0/15")
    ):
        assert allowed
    elif allowed:
        assert effective.is_global and refusal_reason(effective) is None
