"""Finding every problem in a manifest document at once.

Two sources, one shape: pydantic's errors (types, unknown keys, field-level rules of
:mod:`ember.core.manifest_model`) translated into plain messages, and the cross-field
rules below (a service naming an undeclared process, duplicate ports, ...). A problem is
``(loc, message)`` where ``loc`` is the path into the document (keys and list indexes).

Cross-field rules read only values that passed pydantic's validation (a table is read
without its broken keys, see ``_salvage``): a broken value never hides the problems of
the others, and is never judged a second time by a rule that cannot know what was meant.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import pydantic

from ember.core.ids import ENV_NAME_RE
from ember.core.manifest_model import (
    DEFAULT_PROCESS,
    ENV_VAR_RE,
    NAME_RULE,
    OVERRIDABLE,
    PROCESS_NAME_RE,
    RESERVED_ENV_PREFIX,
    Check,
    Deploy,
    EnvironmentOverride,
    Manifest,
    Mount,
    VmGroup,
    format_duration,
    quote,
    suggest,
    toml_type,
)

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

_WANTED: Final = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_STRATEGIES_WITHOUT_VOLUMES: Final = ("canary", "bluegreen")
# The keys each cross-field rule reads (see _salvage).
_CHECK_KEYS: Final = frozenset({"type", "path", "command", "timeout", "interval"})
_GROUP_KEYS: Final = frozenset({"processes"})
_MOUNT_KEYS: Final = frozenset({"processes", "path", "volume"})
M = TypeVar("M", bound=pydantic.BaseModel)


# -- pydantic's errors -------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """The type under ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def type_at(loc: Loc, root: type[pydantic.BaseModel] = Manifest) -> Any:
    """The declared type at ``loc`` (None when the path leaves the model)."""
    tp: Any = root
    for seg in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp) and isinstance(seg, str):
            field = tp.model_fields.get(seg)
            if field is None:
                return None
            tp = field.annotation
        elif origin is list and isinstance(seg, int):
            tp = typing.get_args(tp)[0]
        elif origin is dict and isinstance(seg, str):
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _table_hint(loc: Loc, tp: Any) -> str:
    """`` ([[services.checks]])`` for an array of tables, `` ([deploy])`` for a table."""
    dotted = ".".join(s for s in loc if isinstance(s, str))
    if (
        not loc
        or isinstance(loc[-1], int)
        or any(not _is_bare(s) for s in loc if isinstance(s, str))
    ):
        return ""  # an element of an array, or a path that is no TOML header
    if typing.get_origin(tp) is list and _is_model(_unwrap(typing.get_args(tp)[0])):
        return f" of tables ([[{dotted}]])"
    if _is_model(tp):
        return f" ([{dotted}])"
    return ""


def translate(error: Mapping[str, Any]) -> Problem:
    """One pydantic error as a problem with a message a person can act on."""
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return loc, _unknown_field(loc)
    if kind == "missing":
        hints: dict[Loc, str] = {
            ("schema_version",): " (add schema_version = 1)",
            ("app",): ' (the app\'s name, e.g. app = "hello")',
        }
        return loc, "missing required field" + hints.get(loc, "")
    if kind in _WANTED:
        tp = type_at(loc)
        return loc, f"expected {_WANTED[kind]}{_table_hint(loc, tp)}, got {toml_type(value)}"
    if kind == "literal_error":
        choices = [str(c) for c in typing.get_args(type_at(loc))]
        listed = ", ".join(quote(c) for c in choices)
        return loc, f"expected one of {listed}, got {quote(value)}{suggest(value, choices)}"
    message = str(error["msg"])
    return loc, message[:1].lower() + message[1:]


def _unknown_field(loc: Loc) -> str:
    parent = type_at(loc[:-1])
    key = loc[-1]
    if parent is EnvironmentOverride and key in Manifest.model_fields:
        return "cannot be set per environment (an environment may override: " + (
            ", ".join(OVERRIDABLE) + ")"
        )
    known = tuple(parent.model_fields) if _is_model(parent) else ()
    return "unknown field" + suggest(key, known)


def structural(doc: Mapping[str, Any]) -> list[Problem]:
    """Pydantic's view of the whole document: types, unknown keys, field-level rules."""
    try:
        Manifest.model_validate(doc)
    except pydantic.ValidationError as exc:
        return [translate(e) for e in exc.errors(include_url=False)]
    return []


def _salvage(
    model: type[M], raw: object, loc: Loc, broken: Sequence[Loc], needed: frozenset[str]
) -> M | None:
    """``raw`` (the table at ``loc``) validated without its keys that have problems, or
    None when a key a cross-field rule reads (``needed``) has one: a rule never judges a
    value that failed, nor the default standing in for it."""
    if not isinstance(raw, Mapping):
        return None
    bad = set()
    for where in broken:
        if where[: len(loc)] == loc[: len(where)] and len(where) <= len(loc):
            return None  # the table itself (or what holds it) is wrong
        if where[: len(loc)] == loc:
            bad.add(where[len(loc)])
    if bad & needed:
        return None
    try:
        return model.model_validate({k: v for k, v in raw.items() if k not in bad})
    except pydantic.ValidationError:
        return None


def _items(raw: object) -> list[tuple[int, object]]:
    return list(enumerate(raw)) if isinstance(raw, list) else []


def _sound(broken: Sequence[Loc], loc: Loc) -> bool:
    """No problem at ``loc``, inside it, or at what holds it."""
    return not any(where[: len(loc)] == loc or loc[: len(where)] == where for where in broken)


def _value(doc: Mapping[str, Any], loc: Loc, broken: Sequence[Loc], default: Any) -> Any:
    """The raw value at ``loc`` when it passed the structural check (so it has its declared
    type), ``default`` when absent; ``_UNKNOWN`` when it failed."""
    if not _sound(broken, loc):
        return _UNKNOWN
    value: Any = doc
    for seg in loc:
        if isinstance(seg, int) or seg in value:
            value = value[seg]
        else:
            return default
    return value


_UNKNOWN: Final = object()  # the value failed the structural check
_DEFAULT: Final = object()  # the key is absent: its default applies


def cross_field(doc: Mapping[str, Any], problems: Sequence[Problem]) -> list[Problem]:
    """Rules between fields and tables. They read only values that passed the structural
    check (``problems`` says which did not): a rule never judges a value that failed, nor
    a default standing in for it, and every rule that can be judged is."""
    broken = [loc for loc, _ in problems]
    found: list[Problem] = _names(doc)
    raw_processes = doc.get("processes", {DEFAULT_PROCESS: None})
    declared = (
        sorted(k for k in raw_processes if isinstance(k, str))
        if isinstance(raw_processes, Mapping)
        else None
    )
    services: list[tuple[int, dict[str, Any]]] = []
    checks: list[tuple[int, int, Check]] = []
    for i, raw in _items(doc.get("services")):
        if not isinstance(raw, Mapping) or any(("services", i)[: len(w)] == w for w in broken):
            continue
        given = {
            key: _value(doc, ("services", i, key), broken, default)
            for key, default in (
                ("process", _DEFAULT),
                ("internal_port", _UNKNOWN),
                ("protocol", "tcp"),
            )
        }
        services.append((i, given))
        for j, raw_check in _items(raw.get("checks")):
            loc = ("services", i, "checks", j)
            check = _salvage(Check, raw_check, loc, broken, _CHECK_KEYS)
            if check is not None:
                checks.append((i, j, check))
    found += _services(services, checks, declared)
    groups = [
        (i, g)
        for i, raw in _items(doc.get("vm"))
        if (g := _salvage(VmGroup, raw, ("vm", i), broken, _GROUP_KEYS)) is not None
    ]
    found += _vm(groups, declared)
    mounts = [
        (i, m)
        for i, raw in _items(doc.get("mounts"))
        if (m := _salvage(Mount, raw, ("mounts", i), broken, _MOUNT_KEYS)) is not None
    ]
    found += _mounts(mounts, declared)
    if isinstance(doc.get("deploy", {}), Mapping):
        deploy = {
            key: _value(doc, ("deploy", key), broken, Deploy.model_fields[key].default)
            for key in ("strategy", "max_surge", "max_unavailable")
        }
        found += _deploy(deploy, doc.get("mounts"))
    return found


def _names(doc: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    processes = doc.get("processes")
    if isinstance(processes, Mapping):
        if not processes:
            problems.append(
                (
                    ("processes",),
                    "declare at least one process, or leave [processes] out to run the "
                    'image\'s entrypoint and cmd as process "web"',
                )
            )
        for name in processes:
            if isinstance(name, str) and not PROCESS_NAME_RE.match(name):
                problems.append(
                    (
                        ("processes", name),
                        f"invalid process name: use 1-30 characters: {NAME_RULE}",
                    )
                )
    env = doc.get("env")
    if isinstance(env, Mapping):
        for name in env:
            if not isinstance(name, str):
                continue
            if not ENV_VAR_RE.match(name):
                problems.append(
                    (
                        ("env", name),
                        "invalid variable name: use 1-255 letters, digits and '_', not "
                        "starting with a digit",
                    )
                )
            elif name.upper().startswith(RESERVED_ENV_PREFIX):
                problems.append(
                    (
                        ("env", name),
                        f"names starting with {RESERVED_ENV_PREFIX} are reserved for the platform",
                    )
                )
    environments = doc.get("environments")
    if isinstance(environments, Mapping):
        for name in environments:
            if isinstance(name, str) and not ENV_NAME_RE.match(name):
                problems.append(
                    (
                        ("environments", name),
                        f"invalid environment name: use 1-20 characters: {NAME_RULE}",
                    )
                )
    return problems


def _unknown_process(name: str, declared: list[str]) -> str:
    return (
        f"unknown process {quote(name)}{suggest(name, declared)}; declared in [processes]: "
        + ", ".join(declared)
    )


def _services(
    services: Sequence[tuple[int, dict[str, Any]]],
    checks: Sequence[tuple[int, int, Check]],
    declared: list[str] | None,
) -> list[Problem]:
    problems: list[Problem] = []
    ports: dict[tuple[str, int], int] = {}
    protocols = {i: given["protocol"] for i, given in services}
    for i, given in services:
        process, port = given["process"], given["internal_port"]
        if process is _DEFAULT:
            process = DEFAULT_PROCESS
            if declared is not None and process not in declared:
                problems.append(
                    (
                        ("services", i, "process"),
                        f'not given, so "{DEFAULT_PROCESS}", which is not declared in '
                        "[processes]; name the process this service belongs to",
                    )
                )
        elif process is not _UNKNOWN and declared is not None and process not in declared:
            problems.append((("services", i, "process"), _unknown_process(process, declared)))
        if process is _UNKNOWN or port is _UNKNOWN:
            continue
        key = (process, port)
        if key in ports:
            problems.append(
                (
                    ("services", i, "internal_port"),
                    f"port {port} of process {quote(process)} is already a service "
                    f"(services[{ports[key]}])",
                )
            )
        else:
            ports[key] = i
    for i, j, check in checks:
        problems += _check_rules(("services", i, "checks", j), check, protocols.get(i))
    return problems


def _check_rules(loc: Loc, check: Check, protocol: object) -> list[Problem]:
    problems: list[Problem] = []
    if check.type != "http" and check.path is not None:
        problems.append(((*loc, "path"), 'only allowed when type = "http"'))
    if check.type != "exec" and check.command is not None:
        problems.append(((*loc, "command"), 'only allowed when type = "exec"'))
    if check.type == "exec" and check.command is None:
        problems.append(((*loc, "command"), 'required when type = "exec"'))
    if check.type == "http" and protocol == "tls":
        problems.append(
            (
                (*loc, "type"),
                'an "http" check speaks plain HTTP, but this service\'s protocol is '
                '"tls"; use "tcp" or "exec"',
            )
        )
    if check.timeout > check.interval:
        problems.append(
            (
                (*loc, "timeout"),
                f"{format_duration(check.timeout)} is longer than the interval "
                f"({format_duration(check.interval)})",
            )
        )
    return problems


def _process_list(loc: Loc, names: Sequence[str], declared: list[str] | None) -> list[Problem]:
    """Problems of a list of process names: empty, undeclared, listed twice."""
    problems: list[Problem] = []
    if not names:
        problems.append((loc, "list at least one process"))
    for j, name in enumerate(names):
        if declared is not None and name not in declared:
            problems.append(((*loc, j), _unknown_process(name, declared)))
        elif name in names[:j]:
            problems.append(((*loc, j), f"process {quote(name)} is listed twice"))
    return problems


def _vm(groups: Sequence[tuple[int, VmGroup]], declared: list[str] | None) -> list[Problem]:
    problems: list[Problem] = []
    sized: dict[str, int] = {}
    for i, group in groups:
        problems += _process_list(("vm", i, "processes"), group.processes, declared)
        for j, name in enumerate(group.processes):
            if name in sized and sized[name] != i:
                problems.append(
                    (
                        ("vm", i, "processes", j),
                        f"process {quote(name)} is already sized by vm[{sized[name]}]",
                    )
                )
            sized.setdefault(name, i)
    return problems


def _mounts(mounts: Sequence[tuple[int, Mount]], declared: list[str] | None) -> list[Problem]:
    problems: list[Problem] = []
    paths: dict[tuple[str, str], int] = {}
    volumes: dict[tuple[str, str], int] = {}
    for i, mount in mounts:
        if "processes" in mount.model_fields_set or declared is None or DEFAULT_PROCESS in declared:
            problems += _process_list(("mounts", i, "processes"), mount.processes, declared)
        else:
            problems.append(
                (
                    ("mounts", i, "processes"),
                    f'not given, so ["{DEFAULT_PROCESS}"], but no process "{DEFAULT_PROCESS}" '
                    "is declared in [processes]; list the processes that mount this volume",
                )
            )
        for name in dict.fromkeys(mount.processes):
            j = paths.setdefault((name, mount.path), i)
            if j != i:
                problems.append(
                    (
                        ("mounts", i, "path"),
                        f"{quote(mount.path)} is already a mount of process {quote(name)} "
                        f"(mounts[{j}])",
                    )
                )
            j = volumes.setdefault((name, mount.volume), i)
            if j != i:
                problems.append(
                    (
                        ("mounts", i, "volume"),
                        f"volume {quote(mount.volume)} is already mounted in process "
                        f"{quote(name)} (mounts[{j}])",
                    )
                )
    return problems


def _deploy(deploy: Mapping[str, Any], raw_mounts: object) -> list[Problem]:
    problems: list[Problem] = []
    strategy = deploy["strategy"]
    if strategy == "rolling" and deploy["max_surge"] == 0 and deploy["max_unavailable"] == 0:
        problems.append(
            (
                ("deploy", "max_surge"),
                "max_surge and max_unavailable are both 0, so a rolling deploy could never "
                "replace an instance; set max_surge = 1 (or max_unavailable = 1)",
            )
        )
    if strategy in _STRATEGIES_WITHOUT_VOLUMES and isinstance(raw_mounts, list) and raw_mounts:
        problems.append(
            (
                ("deploy", "strategy"),
                f"{quote(strategy)} cannot be used with volume mounts (a volume belongs to "
                "one instance, so old and new instances cannot run side by side); use "
                '"rolling" or "immediate", or remove [[mounts]]',
            )
        )
    return problems


# -- paths -------------------------------------------------------------------------------


def render_path(loc: Loc) -> str:
    """``("services", 0, "checks", 0, "intervall")`` -> ``services[0].checks[0].intervall``;
    a key that is not a bare TOML key is quoted: ``env."MY VAR"``."""
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            text = seg if _is_bare(seg) else json.dumps(seg, ensure_ascii=False)
            out += f".{text}" if out else text
    return out


def _is_bare(key: str) -> bool:
    return bool(key) and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)


def sort_key(loc: Loc) -> tuple[tuple[int, str, int], ...]:
    """Document order for paths: keys alphabetically, list elements by index."""
    return tuple((1, "", s) if isinstance(s, int) else (0, s, 0) for s in loc)
