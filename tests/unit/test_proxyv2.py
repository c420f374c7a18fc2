"""The PROXY protocol v2 parser and builder (ember.core.proxyv2) against the spec."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.proxyv2 import (
    SIGNATURE,
    TLV,
    BadChecksum,
    BadCommand,
    BadFamily,
    BadLength,
    BadSignature,
    BadTLV,
    BadVersion,
    Command,
    Family,
    Header,
    InvalidHeader,
    NeedMore,
    Parsed,
    ProxyV2Error,
    TLVType,
    Transport,
    build,
    crc32c,
    parse,
    parse_ssl_tlv,
)

ports = st.integers(0, 0xFFFF)
tlv_types = st.integers(0, 0xFF).filter(lambda t: t != TLVType.CRC32C)
tlvs = st.lists(st.builds(TLV, tlv_types, st.binary(max_size=64)), max_size=4).map(tuple)
unix_paths = st.binary(max_size=108).filter(lambda b: not b.endswith(b"\x00"))


@st.composite
def headers(draw: st.DrawFn) -> Header:
    command = draw(st.sampled_from(Command))
    family = draw(st.sampled_from(Family))
    transport = (
        Transport.UNSPEC
        if family is Family.UNSPEC
        else draw(st.sampled_from([Transport.STREAM, Transport.DGRAM]))
    )
    extra = draw(tlvs)
    if family is Family.UNSPEC:
        return Header(command, family, transport, tlvs=extra)
    if family is Family.UNIX:
        return Header(command, family, transport, draw(unix_paths), draw(unix_paths), tlvs=extra)
    addresses = st.ip_addresses(v=4 if family is Family.INET else 6)
    return Header(
        command,
        family,
        transport,
        draw(addresses),
        draw(addresses),
        draw(ports),
        draw(ports),
        extra,
    )


def _tcp4(src: str = "203.0.113.7", sport: int = 51234) -> Header:
    return Header(
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        ipaddress.IPv4Address(src),
        ipaddress.IPv4Address("198.51.100.1"),
        sport,
        443,
    )


# -- the spec's examples, byte for byte ---------------------------------------------------------


def test_tcp4_header_layout_matches_the_spec() -> None:
    wire = build(_tcp4())
    assert wire[:12] == bytes.fromhex("0D0A0D0A000D0A515549540A")
    assert wire[12] == 0x21  # version 2, PROXY
    assert wire[13] == 0x11  # TCP over IPv4
    assert wire[14:16] == (12).to_bytes(2, "big")
    assert wire[16:20] == bytes([203, 0, 113, 7])
    assert wire[20:24] == bytes([198, 51, 100, 1])
    assert wire[24:26] == (51234).to_bytes(2, "big")
    assert wire[26:28] == (443).to_bytes(2, "big")
    assert len(wire) == 28


def test_parse_tcp4_reports_addresses_and_consumed_bytes_leaving_the_payload() -> None:
    result = parse(build(_tcp4()) + b"\x16\x03\x01 rest of the stream")
    assert isinstance(result, Parsed)
    assert result.consumed == 28
    h = result.header
    assert (h.command, h.family, h.transport) == (Command.PROXY, Family.INET, Transport.STREAM)
    assert (str(h.source), h.source_port) == ("203.0.113.7", 51234)
    assert (str(h.destination), h.destination_port) == ("198.51.100.1", 443)


def test_tcp6_and_unix_sizes() -> None:
    v6 = Header(
        Command.PROXY,
        Family.INET6,
        Transport.STREAM,
        ipaddress.IPv6Address("2001:db8::1"),
        ipaddress.IPv6Address("2001:db8::2"),
        1,
        2,
    )
    assert len(build(v6)) == 16 + 36
    unix = Header(Command.PROXY, Family.UNIX, Transport.STREAM, b"/run/a.sock", b"/run/b.sock")
    wire = build(unix)
    assert len(wire) == 16 + 216
    parsed = parse(wire)
    assert isinstance(parsed, Parsed)
    assert parsed.header.source == b"/run/a.sock"


def test_local_command_as_haproxy_health_checks_send_it() -> None:
    wire = SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    result = parse(wire)
    assert result == Parsed(Header(Command.LOCAL), 16)


def test_local_with_an_address_block_is_skipped_by_its_length() -> None:
    # Receivers must honour the length even for LOCAL (the spec: never assume zero).
    wire = build(
        Header(
            Command.LOCAL,
            Family.INET,
            Transport.STREAM,
            ipaddress.IPv4Address("10.0.0.1"),
            ipaddress.IPv4Address("10.0.0.2"),
            1,
            2,
        )
    )
    result = parse(wire + b"payload")
    assert isinstance(result, Parsed)
    assert result.consumed == len(wire)
    assert result.header.command is Command.LOCAL


def test_tlvs_authority_and_ssl() -> None:
    ssl_value = bytes([0x01]) + (0).to_bytes(4, "big") + bytes([0x21, 0, 7]) + b"TLSv1.3"
    h = Header(
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        ipaddress.IPv4Address("10.0.0.1"),
        ipaddress.IPv4Address("10.0.0.2"),
        1000,
        443,
        (
            TLV(TLVType.AUTHORITY, b"api.example.com"),
            TLV(TLVType.SSL, ssl_value),
            TLV(0xE0, b""),
        ),
    )
    result = parse(build(h))
    assert isinstance(result, Parsed)
    assert result.header == h
    assert result.header.authority == "api.example.com"
    info = parse_ssl_tlv(result.header.tlv(TLVType.SSL) or b"")
    assert (info.client, info.verify) == (1, 0)
    assert info.tlvs == (TLV(TLVType.SSL_VERSION, b"TLSv1.3"),)


def test_crc32c_known_answer_and_checksummed_header() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    wire = build(_tcp4(), checksum=True)
    result = parse(wire)
    assert isinstance(result, Parsed)
    assert result.header.tlv(TLVType.CRC32C) is not None
    corrupted = bytearray(wire)
    corrupted[17] ^= 0x01  # flip a bit of the source address
    with pytest.raises(BadChecksum) as err:
        parse(bytes(corrupted))
    assert err.value.code == "proxyv2.bad_checksum"


# -- strict errors with stable codes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "error", "code"),
    [
        (b"GET / HTTP/1.1\r\n", BadSignature, "proxyv2.bad_signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", BadSignature, "proxyv2.bad_signature"),
        (b"\r\n\r\n\x00\r\nQUIX", BadSignature, "proxyv2.bad_signature"),
        (SIGNATURE + b"\x11", BadVersion, "proxyv2.bad_version"),
        (SIGNATURE + b"\x22", BadCommand, "proxyv2.bad_command"),
        (SIGNATURE + b"\x21\x41", BadFamily, "proxyv2.bad_family"),
        (SIGNATURE + b"\x21\x13", BadFamily, "proxyv2.bad_family"),
        (SIGNATURE + b"\x21\x01", BadFamily, "proxyv2.bad_family"),  # UNSPEC family, STREAM
        (SIGNATURE + b"\x21\x10", BadFamily, "proxyv2.bad_family"),  # INET, UNSPEC transport
        (SIGNATURE + b"\x21\x11\x00\x0b", BadLength, "proxyv2.bad_length"),
        (SIGNATURE + b"\x21\x21\x00\x0c", BadLength, "proxyv2.bad_length"),
        (SIGNATURE + b"\x21\x00\x00\x02\x01\x00", BadTLV, "proxyv2.bad_tlv"),
        (SIGNATURE + b"\x21\x00\x00\x04\x01\x00\x05\x00", BadTLV, "proxyv2.bad_tlv"),
    ],
)
def test_malformed_input_raises_a_stable_code(
    wire: bytes, error: type[ProxyV2Error], code: str
) -> None:
    with pytest.raises(error) as err:
        parse(wire)
    assert err.value.code == code
    assert isinstance(err.value, ProxyV2Error)


def test_a_bad_signature_is_rejected_from_its_first_wrong_byte() -> None:
    # A TLS ClientHello is refused after one byte: no waiting for 16 bytes.
    with pytest.raises(BadSignature) as err:
        parse(b"\x16")
    assert err.value.offset == 0
    with pytest.raises(BadSignature) as err:
        parse(SIGNATURE[:5] + b"X")
    assert err.value.offset == 5


def test_builder_refuses_impossible_headers() -> None:
    with pytest.raises(InvalidHeader):
        build(Header(Command.PROXY, Family.INET, Transport.STREAM, ipaddress.IPv6Address("::1")))
    with pytest.raises(InvalidHeader):
        build(Header(Command.PROXY, Family.UNSPEC, Transport.STREAM))
    with pytest.raises(InvalidHeader):
        build(Header(Command.PROXY, Family.UNIX, Transport.STREAM, b"x" * 109, b""))
    with pytest.raises(InvalidHeader):
        build(Header(Command.LOCAL, tlvs=(TLV(1, b"x" * 0x10000),)))


def test_ssl_tlv_too_short() -> None:
    with pytest.raises(BadTLV):
        parse_ssl_tlv(b"\x01\x00")


# -- properties ---------------------------------------------------------------------------------


@given(headers(), st.booleans(), st.binary(max_size=32))
def test_round_trip(header: Header, checksum: bool, payload: bytes) -> None:
    wire = build(header, checksum=checksum)
    result = parse(wire + payload)
    assert isinstance(result, Parsed)
    assert result.consumed == len(wire)
    expected = header
    if checksum:
        crc = result.header.tlvs[-1]
        assert crc.type == TLVType.CRC32C
        expected = Header(**{**header.__dict__, "tlvs": (*header.tlvs, crc)})
    assert result.header == expected


@given(headers(), st.booleans())
def test_every_truncation_needs_more_bytes(header: Header, checksum: bool) -> None:
    wire = build(header, checksum=checksum)
    for cut in range(len(wire)):
        result = parse(wire[:cut])
        assert isinstance(result, NeedMore), cut
        assert 1 <= result.at_least <= len(wire) - cut
    # Reading exactly at_least bytes at a time always reaches the whole header.
    got = b""
    while isinstance(result := parse(got), NeedMore):
        got += wire[len(got) : len(got) + result.at_least]
    assert result.consumed == len(wire)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_the_module_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyV2Error:
        return
    assert isinstance(result, NeedMore | Parsed)


@settings(max_examples=500)
@given(headers(), st.data())
def test_mutated_headers_never_raise_anything_but_the_module_error(
    header: Header, data: st.DataObject
) -> None:
    wire = bytearray(build(header, checksum=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    try:
        result = parse(bytes(wire))
    except ProxyV2Error:
        return
    assert isinstance(result, NeedMore | Parsed)
