"""Request and response bodies of workload logs (docs/specs/api.md, "Logs"): what a host's
agent ships for an instance, and what a user reads for an environment.

The limits are a contract shared by the agent (ember.agent.logship batches within them)
and the API (which refuses more with a stable code). Field names are a contract: add
fields freely, never rename or remove one.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

from pydantic import AwareDatetime, BaseModel, Field

from ember.wire.models import Body

#: A console line longer than this (in characters) is cut by the agent.
MAX_LINE_CHARS: Final = 8192
#: Lines per shipping request.
MAX_BATCH_LINES: Final = 1000
#: The lines of one shipping request together, as UTF-8.
MAX_BATCH_BYTES: Final = 256 * 1024
#: Lines per read.
MAX_READ_LIMIT: Final = 1000

LogStream = Literal["app", "init", "kernel", "agent"]
"""Where a line came from: ``app`` the workload's stdout/stderr (the console does not tell
them apart), ``init`` the platform init (``ember-init: ...``), ``kernel`` the guest
kernel's printk lines (``[    1.234567] ...``), ``agent`` the agent's own notes (lines it
dropped or lost)."""


class LogShipLine(Body):
    ts: AwareDatetime = Field(
        description="When the agent read the line from the console (the console itself "
        "has no timestamps)."
    )
    stream: LogStream = "app"
    line: str = Field(
        max_length=MAX_LINE_CHARS, description="The line without its newline; no NUL."
    )


class LogShipRequest(Body):
    lines: list[LogShipLine] = Field(
        min_length=1,
        max_length=MAX_BATCH_LINES,
        description=f"In console order; at most {MAX_BATCH_BYTES} bytes of text together.",
    )


class LogShipAccepted(BaseModel):
    instance_id: str
    accepted: int = Field(description="Lines stored.")


class LogLine(BaseModel):
    id: int = Field(description="Grows with every line stored in the environment.")
    ts: dt.datetime = Field(description="When the host's agent read the line.")
    stream: LogStream
    process: str
    instance_id: str
    line: str


class LogPage(BaseModel):
    items: list[LogLine] = Field(description="Oldest first.")
    cursor: str = Field(
        description="Pass as ?after= to get the lines stored after these (with ?wait=, "
        "wait for them)."
    )
