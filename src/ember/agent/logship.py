"""Ship the instances' console logs to the control plane (ADR-0016).

The VMM's supervisor writes each VM's serial console — kernel messages, the platform
init's ``ember-init: ...`` lines, the workload's stdout and stderr — to
``<data dir>/vms/<instance>/console.log``, and when that reaches its cap renames it to
``console.log.1`` (replacing the previous one) and starts a new one
(ember.agent.vmm.qemu_shim.CappedLog). Once per agent pass, :meth:`LogShipper.ship`
reads what is new in every instance's console and posts it, in batches, through the
control plane's ``POST /v1/hosts/{host}/instances/{instance}/logs``.

* **Where it resumes.** Per instance, a :class:`Position` — the file (device, inode and
  its first 32 bytes: a rotation frees an inode that the next one reuses at once), the
  byte offset after the last line shipped, and whether an overlong line is being skipped
  — is kept in ``<data dir>/logship.json`` (written atomically after every pass that moved
  one), so a restarted agent neither loses nor repeats more than the batch in flight.
  The position moves only after the control plane accepted the batch: delivery is
  at-least-once.
* **Rotation.** When the saved file is now ``console.log.1``, its rest is read first and
  then the new ``console.log`` from its start (a line cut across the two is joined). When
  the saved file is gone from both names (the console rotated twice between two passes),
  both files are read from their start after an ``agent`` line saying output was lost
  (so, too, when the file was truncated and rewritten). A file shorter than the saved
  offset but with the same first bytes was truncated: it is read from its start.
* **Lines.** Only complete lines are shipped; a partial last line waits for its newline,
  except when the VM has exited (``final``): then it is shipped as it is. A trailing
  ``\\r`` (the serial console's) is dropped, bytes that are not UTF-8 become U+FFFD, and so
  does NUL. A line longer than ``wl.MAX_LINE_CHARS`` is cut and marked ``[truncated]``;
  the rest of it is skipped, even when it arrives in later passes.
* **Streams.** ``[    1.234567] ...`` is a kernel printk line: kept (an OOM kill is the
  kernel's message, and users need it) but marked stream ``kernel``. Lines starting with
  ``ember-init: `` are stream ``init``, everything else ``app``. (A workload can print
  either prefix; the stream is a hint, not a security boundary.)
* **Timestamps.** The console has none: a line's ``ts`` is when the agent read it, so
  lines read in one pass share a time, and output is dated up to one pass late.
* **Rate cap.** Per instance, a token bucket (``rate`` lines a second, bursts of
  ``burst``) admits lines; the rest are dropped, counted, and reported by one ``agent``
  line ``ember: N lines dropped ...`` at the place they were dropped. A chatty guest costs
  the control plane at most ``rate`` lines a second; reading is bounded by
  ``read_budget`` bytes per instance per pass (what is left is read next pass).
* **Failures.** A batch the control plane refuses for good (4xx: invalid, not found,
  forbidden — the instance was moved away, say) is skipped with a warning, or it would be
  sent forever; any other failure (unreachable, 5xx) stops that instance's shipping for
  this pass and the same lines are read again next pass.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ember.core.errors import EmberError, Kind, ValidationFailed
from ember.wire import logs as wl

log = logging.getLogger("ember.agent.logship")

__all__ = [
    "ConsoleRead",
    "LogShipper",
    "Position",
    "RawLine",
    "TokenBucket",
    "classify",
    "tail_console",
]

VERSION = 1
TRUNCATED = " [truncated]"
HEAD_BYTES = 32
_KERNEL_RE = re.compile(r"^\[\s*\d+\.\d+\] ")
_PERMANENT = frozenset({Kind.INVALID, Kind.NOT_FOUND, Kind.FORBIDDEN})

Send = Callable[[str, Sequence[wl.LogShipLine]], object]
"""``send(instance_id, lines)``: post one batch (raises on failure)."""


class LogShipInvalid(ValidationFailed):
    """``logship.json`` is not what this agent wrote."""

    code = "agent.logship_invalid"


# -- reading a console (pure, apart from reading the files) ---------------------------------


@dataclasses.dataclass(frozen=True)
class Position:
    """Where to read on: ``offset`` bytes into the file ``(dev, ino)`` whose first bytes
    were ``head`` (hex; an inode number is reused as soon as a rotation deletes its
    file, so the inode alone would take the newest file for the long gone one);
    ``skipping``: the bytes up to the next newline belong to an overlong line already
    shipped cut."""

    dev: int
    ino: int
    offset: int
    head: str = ""
    skipping: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Position:
        try:
            return cls(
                dev=int(data["dev"]),
                ino=int(data["ino"]),
                offset=int(data["offset"]),
                head=str(data.get("head", "")),
                skipping=bool(data.get("skipping", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LogShipInvalid(f"bad log position {data!r}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class RawLine:
    stream: wl.LogStream
    text: str
    end: Position
    """Where reading resumes once this line is shipped."""


@dataclasses.dataclass(frozen=True)
class ConsoleRead:
    lines: list[RawLine]
    end: Position | None
    """Where reading resumes once every line is shipped (None: no console yet)."""
    lost: bool = False
    """Output between the saved position and what was read is gone (rotated away, or the
    file was truncated and rewritten)."""


@dataclasses.dataclass(frozen=True)
class _File:
    f: BinaryIO
    dev: int
    ino: int
    size: int
    head: bytes

    @classmethod
    def open(cls, path: Path) -> _File | None:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        st = os.fstat(f.fileno())
        return cls(f, st.st_dev, st.st_ino, st.st_size, os.pread(f.fileno(), HEAD_BYTES, 0))

    def same(self, other: _File) -> bool:
        return (self.dev, self.ino) == (other.dev, other.ino)

    def holds(self, pos: Position) -> bool:
        """Is this the file ``pos`` was taken in?"""
        head = bytes.fromhex(pos.head)
        return (self.dev, self.ino) == (pos.dev, pos.ino) and self.head[: len(head)] == head

    def read(self, start: int, budget: int) -> _Part:
        self.f.seek(start)
        return _Part(self, start, self.f.read(max(budget, 0)))


@dataclasses.dataclass(frozen=True)
class _Part:
    file: _File
    start: int  # the file offset of data[0]
    data: bytes


CHECK_RESULT_PREFIX = "ember-init: check "
"""The init's exec-check results (docs/specs/guest-config.md §4.1) carry the secret
per-boot token that authenticates them to the agent: a line holding one anywhere is not
shipped (nor is a workload's imitation of one)."""


def classify(text: str) -> wl.LogStream:
    """The stream of a console line: ``kernel``, ``init`` or ``app``."""
    if text.startswith("ember-init: "):
        return "init"
    if _KERNEL_RE.match(text):
        return "kernel"
    return "app"


def clean(raw: bytes) -> str:
    """A console line as text: no trailing CR, U+FFFD for what is not UTF-8 and for NUL,
    cut to ``wl.MAX_LINE_CHARS`` characters (marked)."""
    text = raw.removesuffix(b"\r").decode("utf-8", "replace").replace("\x00", "\ufffd")
    if len(text) > wl.MAX_LINE_CHARS:
        text = text[: wl.MAX_LINE_CHARS - len(TRUNCATED)] + TRUNCATED
    return text


def tail_console(
    path: Path, saved: Position | None, *, budget: int = 1 << 20, final: bool = False
) -> ConsoleRead:
    """The complete lines of ``path`` (and its rotated ``path.1``) after ``saved``, reading
    at most ``budget`` bytes. ``final``: the writer is gone, ship a partial last line."""
    # Open the current file before the rotated one: a rotation between the two opens then
    # shows the same file twice (harmless), never a rotated file we skipped.
    cur = _File.open(path)
    old = _File.open(path.with_name(path.name + ".1"))
    try:
        if old is not None and cur is not None and old.same(cur):
            old.f.close()
            old = None
        parts, lost, skipping = _parts(cur, old, saved, budget)
        if not parts:
            return ConsoleRead([], saved, lost)
        return _split(parts, skipping, final, lost)
    finally:
        for file in (cur, old):
            if file is not None:
                file.f.close()


def _parts(
    cur: _File | None, old: _File | None, saved: Position | None, budget: int
) -> tuple[list[_Part], bool, bool]:
    """What to read, in order: ``(parts, lost, skipping)``."""
    if saved is not None and cur is not None and cur.holds(saved):
        truncated = cur.size < saved.offset
        start = 0 if truncated else saved.offset
        return [cur.read(start, budget)], False, saved.skipping and not truncated
    parts: list[_Part] = []
    skipping = False
    lost = saved is not None
    if old is not None:
        start = 0
        if saved is not None and old.holds(saved):
            # Rotated since the last pass: the rest of the old file, then the new one.
            lost = False
            start = 0 if old.size < saved.offset else saved.offset
            skipping = saved.skipping and start == saved.offset
        parts.append(old.read(start, budget))
    left = budget - sum(len(p.data) for p in parts)
    old_done = not parts or parts[-1].start + len(parts[-1].data) >= parts[-1].file.size
    if cur is not None and old_done and left > 0:
        parts.append(cur.read(0, left))
    if not parts and cur is not None:
        parts.append(_Part(cur, 0, b""))  # an empty budget: stay at the start
    return parts, lost, skipping


def _split(parts: list[_Part], skipping: bool, final: bool, lost: bool) -> ConsoleRead:
    buf = b"".join(p.data for p in parts)
    bounds: list[tuple[int, _Part]] = []  # (buffer offset of part.data[0], part)
    at = 0
    for p in parts:
        bounds.append((at, p))
        at += len(p.data)

    def position(i: int, skip: bool = False) -> Position:
        # At a boundary the later file wins: its start outlives the earlier file's end.
        for base, p in reversed(bounds):
            if i >= base:
                f = p.file
                return Position(f.dev, f.ino, p.start + (i - base), f.head.hex(), skip)
        raise AssertionError("a position before the first part")  # pragma: no cover

    lines: list[RawLine] = []
    pos = 0
    while (nl := buf.find(b"\n", pos)) >= 0:
        raw, pos = buf[pos:nl], nl + 1
        if skipping:
            skipping = False  # the newline ending the overlong line
            continue
        text = clean(raw)
        lines.append(RawLine(classify(text), text, position(pos)))
    rest = buf[pos:]
    if rest and skipping:
        pos = len(buf)  # still inside the overlong line
    elif rest and (final or len(rest) > wl.MAX_LINE_CHARS * 4):
        # An overlong partial line (no UTF-8 character is longer than 4 bytes): ship its
        # start now and skip the rest up to its newline.
        pos, skipping = len(buf), not final
        text = clean(rest)
        if not final and not text.endswith(TRUNCATED):
            text = text[: wl.MAX_LINE_CHARS - len(TRUNCATED)] + TRUNCATED
        lines.append(RawLine(classify(text), text, position(pos, skipping)))
    return ConsoleRead(lines, position(pos, skipping), lost)


# -- rate cap ---------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` spends one if there is one."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def give_back(self, n: int) -> None:
        self.tokens = min(self.burst, self.tokens + n)


@dataclasses.dataclass(frozen=True)
class _Out:
    line: wl.LogShipLine
    end: Position
    charged: bool  # took a token (given back when its batch is not delivered)


def _admit(read: ConsoleRead, bucket: TokenBucket, ts: dt.datetime, rate: float) -> list[_Out]:
    """The lines the bucket admits, with ``agent`` lines for what was lost or dropped."""
    out: list[_Out] = []
    if read.lost and read.lines:
        note = (
            "ember: console output was lost (the log rotated or was truncated before it "
            "was shipped)"
        )
        out.append(_Out(wl.LogShipLine(ts=ts, stream="agent", line=note), _before(read), False))
    dropped = 0
    last_dropped: Position | None = None

    def flush() -> None:
        nonlocal dropped
        if dropped and last_dropped is not None:
            what = "1 line" if dropped == 1 else f"{dropped} lines"
            note = f"ember: {what} dropped (this instance logs over {rate:g} lines/s)"
            out.append(_Out(wl.LogShipLine(ts=ts, stream="agent", line=note), last_dropped, False))
        dropped = 0

    for raw in read.lines:
        if CHECK_RESULT_PREFIX in raw.text:
            # Carries the boot's check token: never leaves the host. Anywhere in the line:
            # the workload's unfinished output may precede the init's line on it.
            continue
        if bucket.take():
            flush()
            line = wl.LogShipLine(ts=ts, stream=raw.stream, line=raw.text)
            out.append(_Out(line, raw.end, True))
        else:
            dropped += 1
            last_dropped = raw.end
    flush()
    return out


def _before(read: ConsoleRead) -> Position:
    """Where the lost-output note resumes: before the first line read (nothing shipped)."""
    first = read.lines[0].end
    return dataclasses.replace(first, offset=0, skipping=False)


def batches(lines: Sequence[_Out]) -> list[list[_Out]]:
    """Consecutive groups within the wire's limits. The size counts each line as JSON
    with ASCII escapes — never less than its UTF-8 bytes, which is what the API counts,
    and what keeps a request under the API's body limit."""
    out: list[list[_Out]] = []
    batch: list[_Out] = []
    size = 0
    for o in lines:
        n = len(json.dumps(o.line.line)) + 64  # the line and its ts/stream fields
        if batch and (len(batch) >= wl.MAX_BATCH_LINES or size + n > wl.MAX_BATCH_BYTES):
            out.append(batch)
            batch, size = [], 0
        batch.append(o)
        size += n
    if batch:
        out.append(batch)
    return out


# -- the shipper ------------------------------------------------------------------------------


class LogShipper:
    """Per pass, ship what is new in the consoles it is given; see the module docstring."""

    def __init__(
        self,
        path: Path,
        send: Send,
        *,
        rate: float = 200.0,
        burst: float = 2000.0,
        read_budget: int = 1 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.send = send
        self.rate = rate
        self.burst = burst
        self.read_budget = read_budget
        self.clock = clock
        self.positions: dict[str, Position] = self._load()
        self._buckets: dict[str, TokenBucket] = {}

    def ship(self, consoles: Mapping[str, tuple[Path, bool]]) -> int:
        """``consoles``: instance id -> (its console log, whether its VM has exited).
        Instances not named are forgotten. Returns the lines delivered."""
        now = self.clock()
        ts = dt.datetime.fromtimestamp(now, dt.UTC)
        before = dict(self.positions)
        for gone in set(self.positions) - set(consoles):
            del self.positions[gone]
        for gone in set(self._buckets) - set(consoles):
            del self._buckets[gone]
        shipped = 0
        for iid, (console, final) in sorted(consoles.items()):
            shipped += self._ship_one(iid, console, final, now, ts)
        if self.positions != before:
            self._save()
        return shipped

    def _ship_one(self, iid: str, console: Path, final: bool, now: float, ts: dt.datetime) -> int:
        read = tail_console(console, self.positions.get(iid), budget=self.read_budget, final=final)
        if read.end is None:
            return 0
        bucket = self._buckets.get(iid)
        if bucket is None:
            bucket = self._buckets[iid] = TokenBucket(self.rate, self.burst, now)
        bucket.refill(now)
        groups = batches(_admit(read, bucket, ts, self.rate))
        shipped = 0
        for i, batch in enumerate(groups):
            try:
                self.send(iid, [o.line for o in batch])
            except EmberError as exc:
                if exc.kind not in _PERMANENT:
                    log.warning("logs of %s: not shipped, retrying next pass: %s", iid, exc)
                    bucket.give_back(sum(o.charged for b in groups[i:] for o in b))
                    return shipped
                log.warning("logs of %s: %d lines refused, skipped: %s", iid, len(batch), exc)
            else:
                shipped += len(batch)
            self.positions[iid] = batch[-1].end
        # Everything read was shipped (or dropped): resume after it, past dropped lines too.
        self.positions[iid] = read.end
        return shipped

    # -- persistence --------------------------------------------------------------------------

    def _load(self) -> dict[str, Position]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            # Losing the positions repeats some lines; refusing to start loses them all.
            log.warning(
                "%s is not JSON (%s): shipping the consoles from their start", self.path, exc
            )
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION:
            log.warning(
                "%s is not version %d: shipping the consoles from their start", self.path, VERSION
            )
            return {}
        raw = data.get("instances") or {}
        try:
            return {str(k): Position.from_dict(v) for k, v in dict(raw).items()}
        except (LogShipInvalid, TypeError, ValueError) as exc:
            log.warning("%s: %s: shipping the consoles from their start", self.path, exc)
            return {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": VERSION,
            "instances": {k: v.to_dict() for k, v in sorted(self.positions.items())},
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
