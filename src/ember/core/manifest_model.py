"""The manifest's data model: value types, their field-level rules, and the tables of
``ember.toml`` (docs/specs/manifest.md).

Pure: pydantic and the standard library only. Field-level rules (a port's range, a
duration's syntax, a mount path's shape) live on the types here; rules that relate two
fields or two tables live in :mod:`ember.core.manifest_checks`; the public entry points
(parse, validate, normalize, hash, per-environment view) in :mod:`ember.core.manifest`.

Every model is strict (TOML values keep their types: ``"8080"`` is not a port), frozen,
and rejects unknown keys.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import posixpath
import re
import shlex
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from ember.core.ids import ENV_NAME_RE, NAME_RE

#: Manifest format versions this code reads. A bump is a breaking change of the format
#: (docs/specs/manifest.md, "Versioning").
SUPPORTED_SCHEMA_VERSIONS: Final = (1,)

PROCESS_NAME_RE: Final = re.compile(r"^[a-z]([a-z0-9-]{0,28}[a-z0-9])?$")
VOLUME_NAME_RE: Final = re.compile(r"^[a-z]([a-z0-9_-]{0,28}[a-z0-9])?$")
ENV_VAR_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
RESERVED_ENV_PREFIX: Final = "EMBER_"

DEFAULT_PROCESS: Final = "web"
MIN_MEMORY_MB: Final = 128
MAX_MEMORY_MB: Final = 32768
MEMORY_STEP_MB: Final = 64
MIN_CPUS: Final = 1
MAX_CPUS: Final = 16
DEFAULT_CPUS: Final = 1
DEFAULT_MEMORY_MB: Final = 256

#: Signals a process may be asked to stop with (Linux names; the guest is Linux).
SIGNALS: Final = (
    "SIGABRT",
    "SIGHUP",
    "SIGINT",
    "SIGKILL",
    "SIGQUIT",
    "SIGTERM",
    "SIGUSR1",
    "SIGUSR2",
    "SIGWINCH",
)
RESERVED_MOUNT_PATHS: Final = ("/dev", "/proc", "/sys")

NAME_RULE: Final = (
    "lowercase letters, digits and '-', starting with a letter and not ending with '-'"
)
VOLUME_NAME_RULE: Final = (
    "lowercase letters, digits, '-' and '_', starting with a letter and ending with a letter "
    "or digit"
)

# -- helpers -----------------------------------------------------------------------------


def quote(value: object) -> str:
    """A user's value in a message: JSON-style quoting, cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def suggest(value: object, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean "x"?)`` for the closest choice, or an empty string."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote(close[0])}?)" if close else ""


def _fail(message: str) -> PydanticCustomError:
    # The template is a placeholder so that braces in a user's value are never formatted.
    return PydanticCustomError("manifest", "{message}", {"message": message})


def _name_check(
    pattern: re.Pattern[str], what: str, limit: int, rule: str = NAME_RULE
) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise _fail(f"invalid {what} {quote(value)}: use 1-{limit} characters: {rule}")
        return value

    return check


def _int_range(lo: int, hi: int, unit: str = "") -> Callable[[int], int]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise _fail(f"must be between {lo} and {hi}{unit}, got {value}")
        return value

    return check


def _int_schema(lo: int, hi: int) -> WithJsonSchema:
    return WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi})


# -- durations ---------------------------------------------------------------------------

DURATION_RE: Final = re.compile(r"^(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?(?:(\d{1,9})ms)?$")
_UNITS_MS: Final = (3_600_000, 60_000, 1_000, 1)
_UNIT_NAMES: Final = ("h", "m", "s", "ms")


def parse_duration(text: str) -> int:
    """``"1m30s"`` -> 90000 (milliseconds). Units h, m, s, ms, in that order, each at most
    once, whole numbers only. Raises ValueError."""
    m = DURATION_RE.match(text) if isinstance(text, str) else None
    if not m or not text:
        raise ValueError(text)
    return sum(int(part) * unit for part, unit in zip(m.groups(), _UNITS_MS, strict=True) if part)


def format_duration(millis: int) -> str:
    """The canonical spelling: largest units first, zero parts left out, ``"0s"`` for 0."""
    parts = []
    rest = millis
    for unit, name in zip(_UNITS_MS, _UNIT_NAMES, strict=True):
        count, rest = divmod(rest, unit)
        if count:
            parts.append(f"{count}{name}")
    return "".join(parts) or "0s"


def _duration_validator(lo: int, hi: int) -> pydantic.PlainValidator:
    def check(value: object) -> int:
        if not isinstance(value, str):
            raise _fail(f'expected a duration string like "10s", got {toml_type(value)}')
        try:
            millis = parse_duration(value)
        except ValueError:
            raise _fail(
                f"invalid duration {quote(value)}: use whole numbers with the units h, m, s "
                'and ms, largest first (e.g. "500ms", "10s", "1m30s")'
            ) from None
        if not lo <= millis <= hi:
            raise _fail(
                f"must be between {format_duration(lo)} and {format_duration(hi)}, "
                f"got {quote(value)}"
            )
        return millis

    return pydantic.PlainValidator(check)


def _duration_schema(lo: int, hi: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_RE.pattern,
            "description": f"a duration from {format_duration(lo)} to {format_duration(hi)}, "
            "e.g. 500ms, 10s, 1m30s",
        }
    )


_AS_TEXT: Final = pydantic.PlainSerializer(format_duration, return_type=str)

# Durations are held as integer milliseconds and written in their canonical spelling.
Interval = Annotated[
    int, _duration_validator(1_000, 3_600_000), _AS_TEXT, _duration_schema(1_000, 3_600_000)
]
Timeout = Annotated[
    int, _duration_validator(100, 3_600_000), _AS_TEXT, _duration_schema(100, 3_600_000)
]
GracePeriod = Annotated[
    int, _duration_validator(0, 3_600_000), _AS_TEXT, _duration_schema(0, 3_600_000)
]
KillTimeout = Annotated[
    int, _duration_validator(1_000, 300_000), _AS_TEXT, _duration_schema(1_000, 300_000)
]


def toml_type(value: object) -> str:
    """What a value is, in TOML's words."""
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (dict, "a table"),
        (dt.datetime, "a datetime"),
        (dt.date, "a date"),
        (dt.time, "a time"),
    ]
    if value is None:
        return "null"
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


# -- value types -------------------------------------------------------------------------


def _split_command(value: object) -> object:
    if not isinstance(value, str):
        return value
    if "\x00" in value:
        raise _fail("a command cannot contain a NUL character")
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise _fail(f"cannot split the command into words: {str(exc).lower()}") from None


def _check_argv(argv: list[str]) -> list[str]:
    if not argv:
        raise _fail("empty command")
    if not argv[0]:
        raise _fail("the program name (the first word) is empty")
    for i, arg in enumerate(argv):
        if "\x00" in arg:
            raise _fail(f"argument {i} contains a NUL character")
    return argv


_COMMAND_SCHEMA: Final = {
    "oneOf": [
        {"type": "string", "minLength": 1, "description": "split into words like a shell"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ]
}

#: A command: a string (split into words like a POSIX shell does, without running one)
#: or an array of words. Held as the array.
Command = Annotated[
    list[str],
    BeforeValidator(_split_command),
    AfterValidator(_check_argv),
    WithJsonSchema(_COMMAND_SCHEMA),
]


def _check_signal(value: str) -> str:
    if value not in SIGNALS:
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        raise _fail(
            f"unknown signal {quote(value)}{suggest(name, SIGNALS)}; use one of "
            + ", ".join(SIGNALS)
        )
    return value


Signal = Annotated[
    str, AfterValidator(_check_signal), WithJsonSchema({"type": "string", "enum": list(SIGNALS)})
]


def _check_http_path(value: str) -> str:
    if not value.startswith("/"):
        raise _fail(f'must start with "/", e.g. "/healthz", got {quote(value)}')
    if len(value) > 2048 or any(c.isspace() or not c.isprintable() for c in value):
        raise _fail("must be at most 2048 printable characters without spaces")
    return value


HttpPath = Annotated[
    str,
    AfterValidator(_check_http_path),
    WithJsonSchema({"type": "string", "pattern": "^/", "maxLength": 2048}),
]


def _check_mount_path(value: str) -> str:
    if not value.startswith("/"):
        raise _fail(f'must be an absolute path, e.g. "/data", got {quote(value)}')
    if len(value) > 1024 or not value.isprintable():
        raise _fail("must be at most 1024 printable characters")
    if value == "/":
        raise _fail("cannot mount a volume over the root filesystem")
    normal = posixpath.normpath(value).replace("//", "/")
    if normal != value:
        raise _fail(f"use the normalized path {quote(normal)}")
    for reserved in RESERVED_MOUNT_PATHS:
        if value == reserved or value.startswith(reserved + "/"):
            raise _fail(f"{reserved} is reserved by the platform")
    return value


MountPath = Annotated[
    str,
    AfterValidator(_check_mount_path),
    WithJsonSchema({"type": "string", "pattern": "^/.", "maxLength": 1024}),
]


def _check_memory(value: int) -> int:
    if value < MIN_MEMORY_MB:
        raise _fail(f"{value} MiB is below the platform minimum of {MIN_MEMORY_MB} MiB")
    if value > MAX_MEMORY_MB:
        raise _fail(f"{value} MiB is above the platform maximum of {MAX_MEMORY_MB} MiB")
    if value % MEMORY_STEP_MB:
        lower = value - value % MEMORY_STEP_MB
        raise _fail(
            f"{value} MiB is not a multiple of {MEMORY_STEP_MB} MiB "
            f"(use {lower} or {lower + MEMORY_STEP_MB})"
        )
    return value


MemoryMb = Annotated[
    int,
    AfterValidator(_check_memory),
    WithJsonSchema(
        {
            "type": "integer",
            "minimum": MIN_MEMORY_MB,
            "maximum": MAX_MEMORY_MB,
            "multipleOf": MEMORY_STEP_MB,
        }
    ),
]
Cpus = Annotated[int, AfterValidator(_int_range(MIN_CPUS, MAX_CPUS)), _int_schema(1, 16)]
Port = Annotated[int, AfterValidator(_int_range(1, 65535)), _int_schema(1, 65535)]
Surge = Annotated[int, AfterValidator(_int_range(0, 100)), _int_schema(0, 100)]
Retries = Annotated[int, AfterValidator(_int_range(0, 1000)), _int_schema(0, 1000)]


def _check_env_value(value: str) -> str:
    if "\x00" in value:
        raise _fail("a value cannot contain a NUL character")
    return value


EnvValue = Annotated[str, AfterValidator(_check_env_value)]
AppName = Annotated[
    str,
    AfterValidator(_name_check(NAME_RE, "app name", 40)),
    WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern}),
]
OrgName = Annotated[
    str,
    AfterValidator(_name_check(NAME_RE, "org name", 40)),
    WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern}),
]
VolumeName = Annotated[
    str,
    AfterValidator(_name_check(VOLUME_NAME_RE, "volume name", 30, VOLUME_NAME_RULE)),
    WithJsonSchema({"type": "string", "pattern": VOLUME_NAME_RE.pattern}),
]


def _check_schema_version(value: int) -> int:
    if value not in SUPPORTED_SCHEMA_VERSIONS:
        raise _fail(unsupported_version_message(value))
    return value


def unsupported_version_message(value: object) -> str:
    supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
    return (
        f"unsupported schema_version {quote(value)}: this version of ember reads "
        f"schema_version {supported}; upgrade ember to read newer manifests"
    )


SchemaVersion = Annotated[
    int,
    AfterValidator(_check_schema_version),
    WithJsonSchema({"type": "integer", "enum": list(SUPPORTED_SCHEMA_VERSIONS)}),
]

CheckType = Literal["tcp", "http", "exec"]
Protocol = Literal["tcp", "tls"]
Strategy = Literal["rolling", "immediate", "canary", "bluegreen"]
RestartPolicy = Literal["no", "always", "on-failure"]

_PROCESS_KEYS: Final[JsonDict] = {"propertyNames": {"pattern": PROCESS_NAME_RE.pattern}}
_ENV_KEYS: Final[JsonDict] = {
    "propertyNames": {"pattern": ENV_VAR_RE.pattern, "not": {"pattern": "^EMBER_"}}
}


# -- tables ------------------------------------------------------------------------------


class _Table(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Check(_Table):
    """A health check of one service; every check must pass for an instance to be healthy."""

    type: CheckType = Field(
        "tcp",
        description="tcp: the port accepts a connection; http: "
        "GET path answers 2xx/3xx; exec: command exits 0 in the instance",
    )
    path: HttpPath | None = Field(None, description='type = "http" only; default "/"')
    command: Command | None = Field(None, description='type = "exec" only (required there)')
    interval: Interval = Field("10s", validate_default=True, description="between checks")
    timeout: Timeout = Field("2s", validate_default=True, description="at most the interval")
    grace_period: GracePeriod = Field(
        "5s",
        validate_default=True,
        description="after an instance starts, failures in this time do not count",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _http_path_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "http" and "path" not in data:
            return {**data, "path": "/"}
        return data


class Service(_Table):
    """A port of a process the edge may route to."""

    process: str = Field(DEFAULT_PROCESS, description="a process declared in [processes]")
    internal_port: Port = Field(description="the port the process listens on")
    protocol: Protocol = Field("tcp", description="tcp: raw TCP; tls: TLS passthrough on SNI")
    checks: list[Check] = Field(default_factory=list)


class VmGroup(_Table):
    """The size of every instance of the listed processes."""

    processes: list[str] = Field(description="processes declared in [processes]")
    cpus: Cpus = DEFAULT_CPUS
    memory_mb: MemoryMb = Field(DEFAULT_MEMORY_MB, description="hard cap, MiB")


class Deploy(_Table):
    strategy: Strategy = "rolling"
    max_surge: Surge = Field(1, description="rolling: extra instances during a rollout")
    max_unavailable: Surge = Field(0, description="rolling: instances that may be down")
    kill_signal: Signal = "SIGTERM"
    kill_timeout: KillTimeout = Field(
        "5s", validate_default=True, description="wait after kill_signal before SIGKILL"
    )
    release_command: Command | None = Field(
        None, description="runs once per deploy, before the rollout; a failure stops the deploy"
    )


class Restart(_Table):
    policy: RestartPolicy = "on-failure"
    max_retries: Retries = Field(10, description="on-failure: restarts before giving up")


class Mount(_Table):
    volume: VolumeName
    path: MountPath
    processes: list[str] = Field(
        default_factory=lambda: [DEFAULT_PROCESS], description='default ["web"]'
    )


class DeployOverride(_Table):
    """[deploy] keys to replace in one environment."""

    strategy: Strategy | None = None
    max_surge: Surge | None = None
    max_unavailable: Surge | None = None
    kill_signal: Signal | None = None
    kill_timeout: KillTimeout | None = None
    release_command: Command | None = None


class RestartOverride(_Table):
    """[restart] keys to replace in one environment."""

    policy: RestartPolicy | None = None
    max_retries: Retries | None = None


class EnvironmentOverride(_Table):
    """``[environments.<name>]``: merged over the base manifest in that environment.
    Tables (processes, deploy, restart, env) merge key by key; arrays of tables
    (services, vm, mounts) replace the base's array."""

    processes: dict[str, Command | None] | None = Field(None, json_schema_extra=_PROCESS_KEYS)
    services: list[Service] | None = None
    vm: list[VmGroup] | None = None
    deploy: DeployOverride | None = None
    restart: RestartOverride | None = None
    env: dict[str, EnvValue] | None = Field(None, json_schema_extra=_ENV_KEYS)
    mounts: list[Mount] | None = None


def _default_processes() -> dict[str, list[str] | None]:
    return {DEFAULT_PROCESS: None}


class Manifest(_Table):
    """``ember.toml``: how to run an app's image. docs/specs/manifest.md is the contract."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="Ember manifest (ember.toml)",
    )

    schema_version: SchemaVersion = Field(description="the manifest format version")
    app: AppName
    org: OrgName | None = Field(None, description="the org (the CLI's default context)")
    processes: dict[str, Command | None] = Field(
        default_factory=_default_processes,
        description='name -> command; absent: one process "web" running the image\'s '
        "entrypoint and cmd (null)",
        json_schema_extra=_PROCESS_KEYS,
    )
    services: list[Service] = Field(default_factory=list)
    vm: list[VmGroup] = Field(default_factory=list)
    deploy: Deploy = Field(default_factory=Deploy)
    restart: Restart = Field(default_factory=Restart)
    env: dict[str, EnvValue] = Field(
        default_factory=dict, description="plain, non-secret variables", json_schema_extra=_ENV_KEYS
    )
    mounts: list[Mount] = Field(default_factory=list)
    environments: dict[str, EnvironmentOverride] = Field(
        default_factory=dict,
        json_schema_extra={"propertyNames": {"pattern": ENV_NAME_RE.pattern}},
    )


#: The top-level keys an environment may override.
OVERRIDABLE: Final = tuple(EnvironmentOverride.model_fields)
