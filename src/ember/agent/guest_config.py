"""The config drive: what the platform init (``guest/init/init.c``) needs to start one
instance — command, env, user, network, mounts, secrets.

The format is specified in docs/specs/guest-config.md (authoritative): a raw block
device holding a line-oriented text document, zero-padded to a 4 KiB multiple::

    ember-guest-config 1
    hostname web-1
    arg httpd
    arg -f
    env PATH=/usr/bin:/bin
    ...
    end

Sans-IO first: :func:`render` (config → bytes) and :func:`parse` (bytes → config) are
pure, and so are the console parsers (:func:`parse_console_status`,
:func:`parse_check_line`); :func:`write_config_drive` and :func:`read_console` are the
only functions that touch the disk.

Errors::

    EmberError
    └── ValidationFailed        validation.failed
        └── GuestConfigInvalid  guest_config.invalid   a field the init could not use
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path

from ember.core.errors import ValidationFailed

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_ROOT",
    "MAGIC",
    "MAX_SIZE",
    "SIGNALS",
    "CheckLine",
    "ConsoleCursor",
    "GuestCheck",
    "GuestConfig",
    "GuestConfigInvalid",
    "Mount",
    "Network",
    "Secrets",
    "device_for_drive",
    "parse",
    "parse_check_line",
    "parse_console_status",
    "read_console",
    "render",
    "signal_number",
    "write_config_drive",
]

MAGIC = b"ember-guest-config 1\n"
BLOCK_SIZE = 4096
MAX_SIZE = 16 << 20
"""The init refuses larger config drives (docs/specs/guest-config.md)."""

# Linux x86-64 signal numbers: the guest's, whatever the host runs.
SIGNALS: Mapping[str, int] = {
    "SIGHUP": 1,
    "SIGINT": 2,
    "SIGQUIT": 3,
    "SIGILL": 4,
    "SIGTRAP": 5,
    "SIGABRT": 6,
    "SIGBUS": 7,
    "SIGFPE": 8,
    "SIGKILL": 9,
    "SIGUSR1": 10,
    "SIGSEGV": 11,
    "SIGUSR2": 12,
    "SIGPIPE": 13,
    "SIGALRM": 14,
    "SIGTERM": 15,
    "SIGSTKFLT": 16,
    "SIGCHLD": 17,
    "SIGCONT": 18,
    "SIGSTOP": 19,
    "SIGTSTP": 20,
    "SIGTTIN": 21,
    "SIGTTOU": 22,
    "SIGURG": 23,
    "SIGXCPU": 24,
    "SIGXFSZ": 25,
    "SIGVTALRM": 26,
    "SIGPROF": 27,
    "SIGWINCH": 28,
    "SIGIO": 29,
    "SIGPWR": 30,
    "SIGSYS": 31,
}
_SIGNAL_NAMES = {v: k for k, v in SIGNALS.items()}
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_KEY = re.compile(r"^[^=\x00]+$")
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}
_MOUNT_OPTION = re.compile(r"^[A-Za-z0-9_.=:/,+-]*$")
_FSTYPE = re.compile(r"^[a-z0-9_.]+$")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


class GuestConfigInvalid(ValidationFailed):
    code = "guest_config.invalid"


@dataclasses.dataclass(frozen=True)
class Network:
    """eth0 of the guest. Addresses are ``ADDR/PREFIX``; gateways are on the link."""

    ipv6: str | None = None
    ipv6_gateway: str | None = None
    ipv4: str | None = None
    ipv4_gateway: str | None = None
    mtu: int | None = None
    nameservers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Mount:
    """A filesystem mounted before the switch into the root filesystem.

    ``source`` is a guest block device (``/dev/vdc``: see :func:`device_for_drive`) or,
    for pseudo filesystems, any name (``tmpfs``). ``target`` is a path in the guest."""

    source: str
    target: str
    fstype: str = "ext4"
    options: str = "rw"


DEFAULT_ROOT = Mount("/dev/vda", "/", "ext4", "rw")


@dataclasses.dataclass(frozen=True)
class Secrets:
    """One file placed on its own tmpfs (mode 0400, owned by the workload's user)."""

    path: str
    content: bytes


@dataclasses.dataclass(frozen=True)
class GuestCheck:
    """An ``exec`` health check the init runs inside the guest, as the command's user,
    with its environment and working directory (docs/specs/guest-config.md §3)."""

    argv: tuple[str, ...]
    interval_s: float = 10.0
    timeout_s: float = 2.0


@dataclasses.dataclass(frozen=True)
class GuestConfig:
    argv: tuple[str, ...]
    """The command: the process type's command, else the image's Entrypoint + Cmd."""
    env: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None
    user: str = ""
    """The OCI ``User``: ``""`` (root), ``name``, ``uid``, ``name:group``, ``uid:gid``."""
    workdir: str = "/"
    kill_signal: str = "SIGTERM"
    kill_timeout_s: float = 10.0
    network: Network | None = None
    root: Mount = DEFAULT_ROOT
    mounts: tuple[Mount, ...] = ()
    secrets: Secrets | None = None
    checks: tuple[GuestCheck, ...] = ()
    check_token: str | None = None
    """A random per-boot secret the init puts in every check result line (required with
    ``checks``): the workload shares the console and must not be able to forge them."""

    @staticmethod
    def env_from(pairs: Mapping[str, str] | Iterable[str]) -> tuple[tuple[str, str], ...]:
        """``{"K": "V"}`` or OCI-style ``["K=V", ...]`` as ``env``; later keys win."""
        items = (
            list(pairs.items())
            if isinstance(pairs, Mapping)
            else [tuple(s.split("=", 1)) if "=" in s else (s, "") for s in pairs]
        )
        merged: dict[str, str] = {}
        for key, value in items:
            merged.pop(key, None)
            merged[key] = value
        return tuple(merged.items())


def device_for_drive(index: int) -> str:
    """The guest device of the ``index``-th drive (0-based, in ``VmSpec.drives`` order):
    0 → ``/dev/vda``, 25 → ``/dev/vdz``, 26 → ``/dev/vdaa`` (the kernel's naming)."""
    if index < 0:
        raise GuestConfigInvalid(f"drive index {index} is negative")
    name = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        name = chr(ord("a") + rem) + name
    return f"/dev/vd{name}"


# -- encoding -------------------------------------------------------------------------------


def _encode(value: bytes) -> str:
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in value)


_FIELD = re.compile(r"(?:[!-$&-~]|%[0-9A-Fa-f]{2})*")


def _decode(field: str) -> bytes:
    if not _FIELD.fullmatch(field):
        raise GuestConfigInvalid(f"bad %-escape or byte in field {field[:40]!r}")
    return urllib.parse.unquote_to_bytes(field)


def _text(value: str, what: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise GuestConfigInvalid(f"{what} contains a NUL byte", detail={"field": what})
    return data


# -- validation -----------------------------------------------------------------------------


def _guest_path(value: str, what: str) -> str:
    ok = value == "/" or (value.startswith("/") and posixpath.normpath(value) == value)
    if not ok or "\0" in value:
        raise GuestConfigInvalid(
            f"{what} must be an absolute, normalised path, not {value!r}", detail={"field": what}
        )
    return value


def _cidr(value: str, version: int, what: str) -> None:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise GuestConfigInvalid(f"{what}: {exc}", detail={"field": what}) from exc
    if iface.version != version or "/" not in value:
        raise GuestConfigInvalid(
            f"{what} must be an IPv{version} ADDRESS/PREFIX, not {value!r}", detail={"field": what}
        )


def _address(value: str, version: int, what: str) -> None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise GuestConfigInvalid(f"{what}: {exc}", detail={"field": what}) from exc
    if addr.version != version:
        raise GuestConfigInvalid(f"{what} must be an IPv{version} address", detail={"field": what})


def _check_mount(m: Mount, what: str) -> None:
    if not m.source or "\0" in m.source:
        raise GuestConfigInvalid(f"{what}: empty source", detail={"field": what})
    _guest_path(m.target, f"{what}.target")
    if not _FSTYPE.match(m.fstype):
        raise GuestConfigInvalid(f"{what}: bad fstype {m.fstype!r}", detail={"field": what})
    if not _MOUNT_OPTION.match(m.options) or len(m.options) > 900:
        raise GuestConfigInvalid(f"{what}: bad options {m.options!r}", detail={"field": what})


def signal_number(name: str) -> int:
    """``"SIGTERM"``, ``"TERM"`` or ``"15"`` → 15."""
    key = name.strip().upper()
    if key.isdigit() and int(key) in _SIGNAL_NAMES:
        return int(key)
    key = key if key.startswith("SIG") else "SIG" + key
    if key not in SIGNALS:
        raise GuestConfigInvalid(f"unknown signal {name!r}", detail={"field": "kill_signal"})
    return SIGNALS[key]


def _validate(c: GuestConfig) -> None:
    if not c.argv:
        raise GuestConfigInvalid("the command is empty", detail={"field": "argv"})
    if not c.argv[0]:
        raise GuestConfigInvalid("the command's program is empty", detail={"field": "argv"})
    if c.hostname is not None and not _HOSTNAME.match(c.hostname):
        raise GuestConfigInvalid(
            f"hostname {c.hostname!r} is not a DNS label (1-63 letters, digits, '-')",
            detail={"field": "hostname"},
        )
    for key, _ in c.env:
        if not _ENV_KEY.match(key):
            raise GuestConfigInvalid(f"bad env name {key!r}", detail={"field": "env"})
    _guest_path(c.workdir, "workdir")
    signal_number(c.kill_signal)
    if not 0 <= c.kill_timeout_s <= 86_400:
        raise GuestConfigInvalid(
            "kill_timeout_s must be within 0..86400", detail={"field": "kill_timeout_s"}
        )
    _validate_mounts(c)
    _validate_network(c.network)
    _validate_checks(c)


def _validate_checks(c: GuestConfig) -> None:
    if c.check_token is not None and not _TOKEN.fullmatch(c.check_token):
        raise GuestConfigInvalid(
            "check_token must be 16-128 of A-Z a-z 0-9 _ -", detail={"field": "check_token"}
        )
    if c.checks and c.check_token is None:
        raise GuestConfigInvalid("exec checks need a check_token", detail={"field": "check_token"})
    for i, check in enumerate(c.checks):
        what = f"checks[{i}]"
        if not check.argv or not check.argv[0]:
            raise GuestConfigInvalid(f"{what}: the command is empty", detail={"field": what})
        for arg in check.argv:
            _text(arg, what)
        if not 0.1 <= check.interval_s <= 86_400:
            raise GuestConfigInvalid(
                f"{what}: the interval must be within 0.1..86400 s", detail={"field": what}
            )
        if not 0.1 <= check.timeout_s <= check.interval_s:
            raise GuestConfigInvalid(
                f"{what}: the timeout must be within 0.1 s..the interval", detail={"field": what}
            )


def _validate_mounts(c: GuestConfig) -> None:
    _check_mount(c.root, "root")
    targets = set()
    for i, m in enumerate(c.mounts):
        _check_mount(m, f"mounts[{i}]")
        if m.target == "/" or m.target in targets:
            raise GuestConfigInvalid(
                f"mounts[{i}]: target {m.target!r} is taken", detail={"field": "mounts"}
            )
        targets.add(m.target)
    if c.secrets is not None:
        _guest_path(c.secrets.path, "secrets.path")
        if posixpath.dirname(c.secrets.path) in ("/", "") or c.secrets.path.endswith("/"):
            raise GuestConfigInvalid(
                "secrets.path needs a directory of its own (the init mounts a tmpfs on it), "
                f"e.g. /run/secrets/env, not {c.secrets.path!r}",
                detail={"field": "secrets.path"},
            )


def _validate_network(n: Network | None) -> None:
    if n is not None:
        if n.ipv6 is not None:
            _cidr(n.ipv6, 6, "network.ipv6")
        if n.ipv6_gateway is not None:
            _address(n.ipv6_gateway, 6, "network.ipv6_gateway")
        if n.ipv4 is not None:
            _cidr(n.ipv4, 4, "network.ipv4")
        if n.ipv4_gateway is not None:
            _address(n.ipv4_gateway, 4, "network.ipv4_gateway")
        if n.ipv6 is None and n.ipv4 is None:
            raise GuestConfigInvalid("the network has no address", detail={"field": "network"})
        low = 1280 if n.ipv6 is not None else 68
        if n.mtu is not None and not low <= n.mtu <= 65535:
            raise GuestConfigInvalid(
                f"mtu must be within {low}..65535", detail={"field": "network.mtu"}
            )
        for ns in n.nameservers:
            try:
                ipaddress.ip_address(ns)
            except ValueError as exc:
                raise GuestConfigInvalid(
                    f"nameserver: {exc}", detail={"field": "network.nameservers"}
                ) from exc


# -- render / parse -------------------------------------------------------------------------


def _check_fields(check: GuestCheck) -> tuple[bytes, bytes, bytes]:
    """``INTERVAL-MS TIMEOUT-MS ARGV``: ARGV is every word followed by a NUL byte."""
    return (
        str(round(check.interval_s * 1000)).encode(),
        str(round(check.timeout_s * 1000)).encode(),
        b"".join(_text(arg, "checks") + b"\0" for arg in check.argv),
    )


def _parse_check(f: list[str]) -> GuestCheck:
    argv = _decode(f[2])
    if not argv.endswith(b"\0"):
        raise ValueError("a check's command must end with a NUL byte (%00)")
    words = argv[:-1].split(b"\0")
    return GuestCheck(
        tuple(w.decode("utf-8", "surrogateescape") for w in words),
        int(f[0]) / 1000,
        int(f[1]) / 1000,
    )


def _network_lines(n: Network) -> list[tuple[str, str]]:
    out = [("mtu", str(n.mtu))] if n.mtu is not None else []
    for key, value in (
        ("ipv6", n.ipv6),
        ("ipv6-gateway", n.ipv6_gateway),
        ("ipv4", n.ipv4),
        ("ipv4-gateway", n.ipv4_gateway),
    ):
        if value is not None:
            out.append((key, value))
    return out + [("nameserver", ns) for ns in n.nameservers]


def render(config: GuestConfig) -> bytes:
    """The config drive's bytes: the document, zero-padded to a multiple of 4 KiB."""
    _validate(config)
    lines: list[tuple[str, ...]] = []

    def add(key: str, *fields: bytes) -> None:
        lines.append((key, *(_encode(f) for f in fields)))

    c = config
    if c.hostname is not None:
        add("hostname", c.hostname.encode())
    add(
        "root", _text(c.root.source, "root.source"), c.root.fstype.encode(), c.root.options.encode()
    )
    for m in c.mounts:
        add(
            "mount",
            _text(m.source, "mount.source"),
            _text(m.target, "mount.target"),
            m.fstype.encode(),
            m.options.encode(),
        )
    if c.network is not None:
        for key, value in _network_lines(c.network):
            add(key, value.encode())
    for arg in c.argv:
        add("arg", _text(arg, "argv"))
    for key, value in c.env:
        add("env", _text(f"{key}={value}", f"env {key}"))
    add("user", _text(c.user, "user"))
    add("workdir", _text(c.workdir, "workdir"))
    add("kill-signal", str(signal_number(c.kill_signal)).encode())
    add("kill-timeout-ms", str(round(c.kill_timeout_s * 1000)).encode())
    if c.secrets is not None:
        add("secrets", _text(c.secrets.path, "secrets.path"), c.secrets.content)
    if c.check_token is not None:
        add("check-token", c.check_token.encode())
    for check in c.checks:
        add("check", *_check_fields(check))
    body = "".join(" ".join(line) + "\n" for line in lines) + "end\n"
    data = MAGIC + body.encode("ascii")
    if len(data) > MAX_SIZE:
        raise GuestConfigInvalid(
            f"the config drive would be {len(data)} bytes (at most {MAX_SIZE})"
        )
    return data + b"\0" * (-len(data) % BLOCK_SIZE)


def _str(field: str) -> str:
    return _decode(field).decode("utf-8", "surrogateescape")


class _Reader:
    """Accumulates a config drive's lines (see :func:`parse`)."""

    ARITY: Mapping[str, int] = {
        **dict.fromkeys(
            (
                "hostname",
                "mtu",
                "ipv6",
                "ipv6-gateway",
                "ipv4",
                "ipv4-gateway",
                "nameserver",
                "arg",
                "env",
                "user",
                "workdir",
                "kill-signal",
                "kill-timeout-ms",
                "check-token",
            ),
            1,
        ),
        "root": 3,
        "mount": 4,
        "secrets": 2,
        "check": 3,
    }

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.env: list[tuple[str, str]] = []
        self.mounts: list[Mount] = []
        self.nameservers: list[str] = []
        self.net: dict[str, str] = {}
        self.mtu: int | None = None
        self.text: dict[str, str] = {}
        self.root = DEFAULT_ROOT
        self.secrets: Secrets | None = None
        self.kill_signal = "SIGTERM"
        self.kill_timeout_s = 10.0
        self.checks: list[GuestCheck] = []

    def line(self, lineno: int, line: str) -> None:
        key, *f = line.split(" ")
        want = self.ARITY.get(key)
        if want is None:
            return  # unknown keys are skipped, as the init does (forward compatibility)
        if len(f) != want:
            raise GuestConfigInvalid(f"line {lineno}: {key!r} takes {want} field(s)")
        try:
            self._fields(key, f)
        except ValueError as exc:
            raise GuestConfigInvalid(f"line {lineno}: {exc}") from exc

    def _fields(self, key: str, f: list[str]) -> None:
        if key == "arg":
            self.argv.append(_str(f[0]))
        elif key == "env":
            k, _, v = _str(f[0]).partition("=")
            self.env.append((k, v))
        elif key == "root":
            self.root = Mount(_str(f[0]), "/", _str(f[1]), _str(f[2]))
        elif key == "mount":
            self.mounts.append(Mount(*(_str(x) for x in f)))
        elif key == "mtu":
            self.mtu = int(f[0])
        elif key in ("ipv6", "ipv6-gateway", "ipv4", "ipv4-gateway"):
            self.net[key.replace("-", "_")] = _str(f[0])
        elif key == "nameserver":
            self.nameservers.append(_str(f[0]))
        elif key == "kill-signal":
            self.kill_signal = _SIGNAL_NAMES.get(int(f[0]), f[0])
        elif key == "kill-timeout-ms":
            self.kill_timeout_s = int(f[0]) / 1000
        elif key == "secrets":
            self.secrets = Secrets(_str(f[0]), _decode(f[1]))
        elif key == "check":
            self.checks.append(_parse_check(f))
        else:  # hostname, user, workdir, check-token
            self.text[key] = _str(f[0])

    def config(self) -> GuestConfig:
        network = None
        if self.net or self.mtu is not None or self.nameservers:
            network = Network(
                ipv6=self.net.get("ipv6"),
                ipv6_gateway=self.net.get("ipv6_gateway"),
                ipv4=self.net.get("ipv4"),
                ipv4_gateway=self.net.get("ipv4_gateway"),
                mtu=self.mtu,
                nameservers=tuple(self.nameservers),
            )
        return GuestConfig(
            argv=tuple(self.argv),
            env=tuple(self.env),
            hostname=self.text.get("hostname"),
            user=self.text.get("user", ""),
            workdir=self.text.get("workdir", "/"),
            kill_signal=self.kill_signal,
            kill_timeout_s=self.kill_timeout_s,
            network=network,
            root=self.root,
            mounts=tuple(self.mounts),
            secrets=self.secrets,
            checks=tuple(self.checks),
            check_token=self.text.get("check-token"),
        )


def parse(data: bytes) -> GuestConfig:
    """A config drive's bytes back into a :class:`GuestConfig` (tests, debugging);
    follows the same rules as the init."""
    if not data.startswith(MAGIC):
        raise GuestConfigInvalid("not an Ember config drive (bad magic)")
    try:
        text = data[len(MAGIC) :].split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError as exc:
        raise GuestConfigInvalid("the config drive holds non-ASCII bytes") from exc
    lines = text.split("\n")
    if "end" not in lines:
        raise GuestConfigInvalid("no 'end' line (truncated config drive?)")
    reader = _Reader()
    for lineno, line in enumerate(lines[: lines.index("end")], start=2):
        if line:
            reader.line(lineno, line)
    config = reader.config()
    _validate(config)
    return config


# -- the console ----------------------------------------------------------------------------

_EXIT_LINE = re.compile(r"ember-init: exit status (\d+)")
_FAIL_LINE = re.compile(r"ember-init: boot failed: ([^\r\n]*)")


def parse_console_status(text: str) -> tuple[int | None, str | None]:
    """The init's verdict from (the end of) a console log: ``(exit status, boot failure)``,
    the last of each; ``(None, None)`` while the workload runs."""
    codes = _EXIT_LINE.findall(text)
    failures = _FAIL_LINE.findall(text)
    return (int(codes[-1]) if codes else None, failures[-1] if failures else None)


@dataclasses.dataclass(frozen=True)
class CheckLine:
    """One exec check result of the init: check ``index`` (the drive's order) passed,
    or failed with ``detail`` (``status N``, ``signal N``, ``timeout``, ``fork failed: …``)."""

    index: int
    ok: bool
    detail: str = ""


def parse_check_line(line: str, token: str) -> CheckLine | None:
    """The exec check result in one console line, or None: not a result line, or one
    without this boot's ``token`` (the workload printing a look-alike). Matched anywhere
    in the line, like the status lines: the workload's output without a final newline may
    precede the init's line, look-alikes included; the init's line ends the line."""
    if not token or token not in line:
        return None
    pattern = rf"ember-init: check {re.escape(token)} (\d{{1,9}}) (ok|fail)(?: ([^\r\n]*))?"
    m = re.search(pattern, line)
    if m is None:
        return None
    return CheckLine(int(m.group(1)), m.group(2) == "ok", (m.group(3) or "").strip())


@dataclasses.dataclass(frozen=True)
class ConsoleCursor:
    """How far :func:`read_console` got: the file (by inode) and offset it read to,
    and an unfinished last line."""

    inode: int | None = None
    offset: int = 0
    partial: bytes = b""

    @classmethod
    def at_end(cls, path: Path) -> ConsoleCursor:
        """Past everything ``path`` holds now (an adopted VM: its history is old news)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return cls()
        return cls(st.st_ino, st.st_size)


# -- I/O ------------------------------------------------------------------------------------


_PARTIAL_MAX = 4096
"""A longer unfinished line keeps only its end (the init's lines are shorter)."""


def _rest_of_rotated(path: Path, cursor: ConsoleCursor, limit: int) -> bytes:
    rotated = path.with_name(path.name + ".1")
    try:
        with rotated.open("rb") as f:
            if os.fstat(f.fileno()).st_ino != cursor.inode:
                return b""  # rotated twice since: that part is gone
            f.seek(cursor.offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def read_console(
    path: Path, cursor: ConsoleCursor, limit: int = 1 << 20
) -> tuple[list[str], ConsoleCursor]:
    """The complete lines written to the console log ``path`` since ``cursor`` (without
    ``\\r``), and the new cursor. At most ``limit`` bytes are read per call; the rest
    of ``path`` comes with the next call.

    Follows the VMM's log rotation (``qemu_shim.CappedLog``: the full log becomes
    ``PATH.1`` and a new ``PATH`` starts): when ``PATH`` is another file than the
    cursor's, the rest of ``PATH.1`` comes first (up to ``limit``), then ``PATH`` from its
    start. A log that shrank is read again from its start."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return [], cursor
    with f:
        st = os.fstat(f.fileno())
        data = b""
        if cursor.inode is not None and st.st_ino != cursor.inode:
            data = _rest_of_rotated(path, cursor, limit)
            offset = 0
        else:
            offset = cursor.offset if st.st_size >= cursor.offset else 0
        f.seek(offset)
        more = f.read(max(0, limit - len(data)))
    lines = (cursor.partial + data + more).split(b"\n")
    partial = lines.pop()[-_PARTIAL_MAX:]
    text = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
    return text, ConsoleCursor(st.st_ino, offset + len(more), partial)


def write_config_drive(config: GuestConfig, path: Path) -> Path:
    """Write the config drive image to ``path`` (atomically; mode 0600: it may hold
    secrets). Returns ``path``."""
    data = render(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
