"""PROXY protocol version 2: a sans-IO parser and builder (HAProxy's proxy-protocol.txt, 2.2).

The edge sends this header on the upstream connection of routes that opt in (ADR 0009);
instances, test backends and tools parse it with :func:`parse`. Nothing here does I/O:
feed :func:`parse` the bytes received so far and it answers either :class:`NeedMore`
(a valid prefix; read more and call again with everything received) or :class:`Parsed`
(the header and how many bytes it took; the rest belongs to the proxied stream)::

    buf = b""
    while isinstance(result := parse(buf), NeedMore):
        buf += sock.recv(result.at_least)   # at_least is a lower bound, never too much

Wire format (all integers big-endian)::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
              | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
     2 bytes  length of everything that follows
     ...      addresses: INET 4+4+2+2 = 12, INET6 16+16+2+2 = 36, UNIX 108+108 = 216 bytes
     ...      TLVs to the end: type (1 byte), length (2 bytes), value

The parser is strict: any byte that cannot start or continue a valid header raises a
:class:`ProxyV2Error` subclass with a stable ``code`` as soon as it is seen, so a server
can drop a bad peer without waiting for more input. Errors::

    ProxyV2Error (ValidationFailed)  proxyv2.invalid
    ├── BadSignature                  proxyv2.bad_signature   not a v2 header at all
    ├── BadVersion                    proxyv2.bad_version     version nibble is not 2
    ├── BadCommand                    proxyv2.bad_command     command is not LOCAL/PROXY
    ├── BadFamily                     proxyv2.bad_family      not one of the 7 valid
    │                                                         family/transport bytes
    ├── BadLength                     proxyv2.bad_length      block shorter than its addresses
    ├── BadTLV                        proxyv2.bad_tlv         a TLV runs past the block
    ├── BadChecksum                   proxyv2.bad_checksum    CRC32C TLV does not match
    └── InvalidHeader                 proxyv2.invalid_header  the builder got an impossible
                                                              header (wrong address type...)

A LOCAL header (HAProxy's health checks send one) means "use the real endpoints"; the
parser still returns whatever addresses it carries, and callers decide by ``command``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import struct
from typing import ClassVar, Final

from ember.core.errors import ValidationFailed

__all__ = [
    "HEADER_FIXED_LEN",
    "SIGNATURE",
    "TLV",
    "BadChecksum",
    "BadCommand",
    "BadFamily",
    "BadLength",
    "BadSignature",
    "BadTLV",
    "BadVersion",
    "Command",
    "Family",
    "Header",
    "InvalidHeader",
    "NeedMore",
    "Parsed",
    "ProxyV2Error",
    "SSLInfo",
    "TLVType",
    "Transport",
    "build",
    "crc32c",
    "parse",
    "parse_ssl_tlv",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED_LEN: Final = 16
"""Signature, version/command, family/transport, length."""
UNIX_PATH_LEN: Final = 108

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Address = IPAddress | bytes


class Command(enum.IntEnum):
    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class TLVType(enum.IntEnum):
    """Registered TLV types (custom ones, 0xE0-0xEF, are plain ints)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    NETNS = 0x30


_ADDRESS_LEN: Final[dict[tuple[Family, Transport], int]] = {
    (Family.UNSPEC, Transport.UNSPEC): 0,
    (Family.INET, Transport.STREAM): 12,
    (Family.INET, Transport.DGRAM): 12,
    (Family.INET6, Transport.STREAM): 36,
    (Family.INET6, Transport.DGRAM): 36,
    (Family.UNIX, Transport.STREAM): 2 * UNIX_PATH_LEN,
    (Family.UNIX, Transport.DGRAM): 2 * UNIX_PATH_LEN,
}
"""The only family/transport pairs the spec allows, with their address block size."""


# -- errors -------------------------------------------------------------------------------


class ProxyV2Error(ValidationFailed):
    """The bytes are not (the start of) a valid PROXY v2 header; drop the connection."""

    code: ClassVar[str] = "proxyv2.invalid"

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message, detail={} if offset is None else {"offset": offset})
        self.offset = offset


class BadSignature(ProxyV2Error):
    code = "proxyv2.bad_signature"


class BadVersion(ProxyV2Error):
    code = "proxyv2.bad_version"


class BadCommand(ProxyV2Error):
    code = "proxyv2.bad_command"


class BadFamily(ProxyV2Error):
    code = "proxyv2.bad_family"


class BadLength(ProxyV2Error):
    code = "proxyv2.bad_length"


class BadTLV(ProxyV2Error):
    code = "proxyv2.bad_tlv"


class BadChecksum(ProxyV2Error):
    code = "proxyv2.bad_checksum"


class InvalidHeader(ProxyV2Error):
    code = "proxyv2.invalid_header"


# -- values -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLV:
    type: int
    value: bytes


@dataclasses.dataclass(frozen=True)
class Header:
    """A PROXY v2 header. Addresses are ``ipaddress`` objects for INET/INET6 and the raw
    path bytes (trailing NULs removed) for UNIX; ``None`` for UNSPEC."""

    command: Command
    family: Family = Family.UNSPEC
    transport: Transport = Transport.UNSPEC
    source: Address | None = None
    destination: Address | None = None
    source_port: int | None = None
    destination_port: int | None = None
    tlvs: tuple[TLV, ...] = ()

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of this type, if any."""
        for t in self.tlvs:
            if t.type == type_:
                return t.value
        return None

    @property
    def authority(self) -> str | None:
        """The SNI / host name the client asked for (PP2_TYPE_AUTHORITY), if sent."""
        value = self.tlv(TLVType.AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class NeedMore:
    """The input is a valid prefix; at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclasses.dataclass(frozen=True)
class Parsed:
    header: Header
    consumed: int
    """Bytes of the input that belong to the header; the proxied stream starts here."""


@dataclasses.dataclass(frozen=True)
class SSLInfo:
    """The value of a PP2_TYPE_SSL TLV."""

    client: int
    verify: int
    tlvs: tuple[TLV, ...]


# -- parsing ------------------------------------------------------------------------------


def parse(data: bytes | bytearray | memoryview) -> Parsed | NeedMore:
    """Parse a header at the start of ``data``; see the module docstring."""
    view = memoryview(data)
    prefix = bytes(view[: len(SIGNATURE)])
    if prefix != SIGNATURE[: len(prefix)]:
        offset = next(i for i, (a, b) in enumerate(zip(prefix, SIGNATURE, strict=False)) if a != b)
        raise BadSignature("not a PROXY protocol v2 signature", offset=offset)
    if len(view) < 13:
        return NeedMore(HEADER_FIXED_LEN - len(view))
    ver_cmd = view[12]
    if ver_cmd >> 4 != 2:
        raise BadVersion(f"PROXY protocol version {ver_cmd >> 4}, expected 2", offset=12)
    if ver_cmd & 0x0F not in (Command.LOCAL, Command.PROXY):
        raise BadCommand(f"unknown PROXY v2 command {ver_cmd & 0x0F:#x}", offset=12)
    command = Command(ver_cmd & 0x0F)
    if len(view) < 14:
        return NeedMore(HEADER_FIXED_LEN - len(view))
    fam_byte = view[13]
    family, transport = fam_byte >> 4, fam_byte & 0x0F
    if family > Family.UNIX or transport > Transport.DGRAM:
        raise BadFamily(f"unknown family/transport byte {fam_byte:#04x}", offset=13)
    pair = (Family(family), Transport(transport))
    address_len = _ADDRESS_LEN.get(pair)
    if address_len is None:
        raise BadFamily(f"invalid family/transport combination {fam_byte:#04x}", offset=13)
    if len(view) < HEADER_FIXED_LEN:
        return NeedMore(HEADER_FIXED_LEN - len(view))
    (block_len,) = struct.unpack_from("!H", view, 14)
    if block_len < address_len:
        raise BadLength(
            f"address block of {block_len} bytes, {pair[0].name}/{pair[1].name} needs"
            f" {address_len}",
            offset=14,
        )
    total = HEADER_FIXED_LEN + block_len
    if len(view) < total:
        return NeedMore(total - len(view))
    header_bytes = bytes(view[:total])
    block = header_bytes[HEADER_FIXED_LEN:]
    source, destination, sport, dport = _addresses(pair, block[:address_len])
    tlvs = _tlvs(block, address_len, base=HEADER_FIXED_LEN)
    _verify_crc32c(header_bytes, tlvs)
    header = Header(command, pair[0], pair[1], source, destination, sport, dport, tlvs)
    return Parsed(header, total)


def _addresses(
    pair: tuple[Family, Transport], raw: bytes
) -> tuple[Address | None, Address | None, int | None, int | None]:
    family = pair[0]
    if family is Family.INET:
        sport, dport = struct.unpack_from("!HH", raw, 8)
        return ipaddress.IPv4Address(raw[0:4]), ipaddress.IPv4Address(raw[4:8]), sport, dport
    if family is Family.INET6:
        sport, dport = struct.unpack_from("!HH", raw, 32)
        return ipaddress.IPv6Address(raw[0:16]), ipaddress.IPv6Address(raw[16:32]), sport, dport
    if family is Family.UNIX:
        src = raw[:UNIX_PATH_LEN].rstrip(b"\x00")
        dst = raw[UNIX_PATH_LEN:].rstrip(b"\x00")
        return src, dst, None, None
    return None, None, None, None


def _tlvs(block: bytes, start: int, *, base: int) -> tuple[TLV, ...]:
    out: list[TLV] = []
    pos = start
    while pos < len(block):
        if len(block) - pos < 3:
            raise BadTLV(f"{len(block) - pos} stray bytes after the last TLV", offset=base + pos)
        type_, length = block[pos], int.from_bytes(block[pos + 1 : pos + 3], "big")
        if pos + 3 + length > len(block):
            raise BadTLV(
                f"TLV {type_:#04x} of {length} bytes runs past the header", offset=base + pos
            )
        out.append(TLV(type_, block[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    return tuple(out)


def _verify_crc32c(header_bytes: bytes, tlvs: tuple[TLV, ...]) -> None:
    """A CRC32C TLV, when present, covers the whole header with its own value zeroed."""
    pos = _address_end(header_bytes)
    for t in tlvs:
        if t.type == TLVType.CRC32C:
            if len(t.value) != 4:
                raise BadTLV(f"CRC32C TLV of {len(t.value)} bytes, expected 4", offset=pos)
            zeroed = header_bytes[: pos + 3] + b"\x00" * 4 + header_bytes[pos + 7 :]
            if crc32c(zeroed) != int.from_bytes(t.value, "big"):
                raise BadChecksum("CRC32C of the PROXY v2 header does not match", offset=pos)
            return
        pos += 3 + len(t.value)


def _address_end(header_bytes: bytes) -> int:
    fam = header_bytes[13]
    return HEADER_FIXED_LEN + _ADDRESS_LEN[(Family(fam >> 4), Transport(fam & 0x0F))]


def parse_ssl_tlv(value: bytes) -> SSLInfo:
    """Decode a PP2_TYPE_SSL value: client flags, verify result, sub-TLVs."""
    if len(value) < 5:
        raise BadTLV(f"SSL TLV of {len(value)} bytes, needs at least 5")
    client, verify = value[0], int.from_bytes(value[1:5], "big")
    return SSLInfo(client, verify, _tlvs(value, 5, base=0))


# -- building -----------------------------------------------------------------------------


def build(header: Header, *, checksum: bool = False) -> bytes:
    """The wire bytes of ``header``; with ``checksum`` a CRC32C TLV is appended (and any
    CRC32C TLV already in ``header.tlvs`` is recomputed)."""
    pair = (header.family, header.transport)
    if pair not in _ADDRESS_LEN:
        raise InvalidHeader(f"invalid family/transport {pair[0].name}/{pair[1].name}")
    block = _build_addresses(header)
    tlvs = [t for t in header.tlvs if not (checksum and t.type == TLVType.CRC32C)]
    if checksum:
        tlvs.append(TLV(TLVType.CRC32C, b"\x00" * 4))
    for t in tlvs:
        if not 0 <= t.type <= 0xFF or len(t.value) > 0xFFFF:
            raise InvalidHeader(f"TLV {t.type} with {len(t.value)} bytes cannot be encoded")
        block += bytes([t.type]) + len(t.value).to_bytes(2, "big") + t.value
    if len(block) > 0xFFFF:
        raise InvalidHeader(f"header block of {len(block)} bytes exceeds 65535")
    out = bytearray(SIGNATURE)
    out.append(0x20 | header.command)
    out.append(header.family << 4 | header.transport)
    out += len(block).to_bytes(2, "big") + block
    if checksum or any(t.type == TLVType.CRC32C for t in tlvs):
        _fill_crc32c(out)
    return bytes(out)


def _build_addresses(h: Header) -> bytes:
    if h.family is Family.UNSPEC:
        if h.source is not None or h.destination is not None:
            raise InvalidHeader("an UNSPEC header carries no addresses")
        return b""
    if h.family is Family.UNIX:
        src, dst = h.source, h.destination
        if (
            not (isinstance(src, bytes) and isinstance(dst, bytes))
            or max(len(src), len(dst)) > UNIX_PATH_LEN
        ):
            raise InvalidHeader(f"UNIX addresses must be bytes of at most {UNIX_PATH_LEN}")
        if h.source_port is not None or h.destination_port is not None:
            raise InvalidHeader("UNIX addresses have no ports")
        return src.ljust(UNIX_PATH_LEN, b"\x00") + dst.ljust(UNIX_PATH_LEN, b"\x00")
    kind = ipaddress.IPv4Address if h.family is Family.INET else ipaddress.IPv6Address
    if not (isinstance(h.source, kind) and isinstance(h.destination, kind)):
        raise InvalidHeader(f"{h.family.name} addresses must be {kind.__name__} objects")
    ports = (h.source_port, h.destination_port)
    if not all(isinstance(p, int) and 0 <= p <= 0xFFFF for p in ports):
        raise InvalidHeader(f"ports must be 0..65535, got {ports}")
    return h.source.packed + h.destination.packed + struct.pack("!HH", *ports)


def _fill_crc32c(out: bytearray) -> None:
    pos = _address_end(bytes(out[:HEADER_FIXED_LEN]))
    while pos < len(out):
        type_, length = out[pos], int.from_bytes(out[pos + 1 : pos + 3], "big")
        if type_ == TLVType.CRC32C and length == 4:
            out[pos + 3 : pos + 7] = b"\x00" * 4
            out[pos + 3 : pos + 7] = crc32c(bytes(out)).to_bytes(4, "big")
            return
        pos += 3 + length


# -- CRC32C (Castagnoli, RFC 4960 appendix B) --------------------------------------------------


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


def crc32c(data: bytes) -> int:
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
