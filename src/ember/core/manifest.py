"""The app manifest, ``ember.toml``: parse, validate, normalize, hash, and the view of one
environment. docs/specs/manifest.md is the contract; this module implements it.

Pure functions over text and data (no I/O)::

    parse_manifest(text)          TOML text -> Manifest              raises ManifestInvalid
    validate_manifest(data)       a parsed document (dict) -> Manifest   raises ManifestInvalid
    normalize(manifest)           the canonical document: defaults filled, canonical order
    manifest_hash(manifest)       "sha256:<hex>" of canonical_json(normalize(manifest))
    for_environment(manifest, e)  the base with [environments.<e>] merged over it

Errors (one class; every problem of a document is reported at once)::

    ValidationFailed
    └── ManifestInvalid    manifest.invalid    detail: {"source", "errors": [ManifestError]}

A manifest is checked in two passes that both always run: the model's own rules
(:mod:`ember.core.manifest_model`: types, unknown keys, per-field limits) and the rules
between fields (:mod:`ember.core.manifest_checks`). Each environment is then checked as
the merged document it produces; a problem that exists only there is reported under
``environments.<name>.``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import pydantic

from ember.core.errors import ValidationFailed
from ember.core.ids import ENV_NAME_RE
from ember.core.manifest_checks import (
    Problem,
    cross_field,
    render_path,
    sort_key,
    structural,
    translate,
)
from ember.core.manifest_model import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PROCESS,
    SUPPORTED_SCHEMA_VERSIONS,
    Check,
    Deploy,
    DeployOverride,
    EnvironmentOverride,
    Manifest,
    Mount,
    Restart,
    RestartOverride,
    Service,
    VmGroup,
    format_duration,
    parse_duration,
    toml_type,
    unsupported_version_message,
)

__all__ = [
    "MAX_MANIFEST_BYTES",
    "SUPPORTED_SCHEMA_VERSIONS",
    "Check",
    "Deploy",
    "DeployOverride",
    "EnvironmentOverride",
    "Manifest",
    "ManifestError",
    "ManifestInvalid",
    "Mount",
    "Restart",
    "RestartOverride",
    "Service",
    "VmGroup",
    "canonical_json",
    "check_manifest",
    "for_environment",
    "format_duration",
    "json_schema",
    "manifest_hash",
    "normalize",
    "parse_duration",
    "parse_manifest",
    "render_json_schema",
    "validate_manifest",
]

MAX_MANIFEST_BYTES: Final = 1024 * 1024

#: Tables an environment merges key by key; everything else it replaces.
_MERGED_TABLES: Final = ("processes", "deploy", "restart", "env")
#: Arrays of tables: canonical order, defaults filled in each element.
_ARRAYS: Final = ("services", "vm", "mounts")
_TOML_POSITION = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)


@dataclasses.dataclass(frozen=True)
class ManifestError:
    """One problem: ``path`` into the document (``services[0].checks[0].interval``), or
    for TOML syntax errors ``line`` and ``column`` (1-based) with an empty path."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"line {self.line}, column {self.column}: {self.message}"
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "message": self.message}
        if self.line is not None:
            out |= {"line": self.line, "column": self.column}
        return out


class ManifestInvalid(ValidationFailed):
    """The manifest has problems. Raised by this module through :meth:`of`, which lists
    every problem in ``detail["errors"]`` (path order) and one per line in the message."""

    code = "manifest.invalid"

    @classmethod
    def of(cls, errors: Sequence[ManifestError], *, source: str = "ember.toml") -> ManifestInvalid:
        count = f"{len(errors)} error{'' if len(errors) == 1 else 's'}"
        return cls(
            f"{source} is not a valid manifest ({count}):\n" + "\n".join(str(e) for e in errors),
            hint="fix every error listed (docs/specs/manifest.md describes each key), then "
            "run 'ember manifest validate' again",
            detail={"source": source, "errors": [e.to_dict() for e in errors]},
        )

    @property
    def errors(self) -> list[ManifestError]:
        return [
            ManifestError(
                str(e.get("path", "")), str(e.get("message", "")), e.get("line"), e.get("column")
            )
            for e in self.detail.get("errors", [])
            if isinstance(e, Mapping)
        ]


# -- parse and validate ------------------------------------------------------------------


def parse_manifest(text: str, *, source: str = "ember.toml") -> Manifest:
    """Parse ``ember.toml`` text; raise :class:`ManifestInvalid` listing every problem.
    ``source`` names the file in messages."""
    return validate_manifest(_load_toml(text, source), source=source)


def validate_manifest(data: Mapping[str, Any], *, source: str = "ember.toml") -> Manifest:
    """Validate a parsed document (from TOML, or a normalized manifest from JSON)."""
    errors = check_manifest(data)
    if errors:
        raise ManifestInvalid.of(errors, source=source)
    try:
        return Manifest.model_validate(data)
    except pydantic.ValidationError as exc:  # unreachable while check_manifest is complete
        raise ManifestInvalid.of(
            _errors([translate(e) for e in exc.errors()]), source=source
        ) from exc


def check_manifest(data: object) -> list[ManifestError]:
    """Every problem of a parsed document, in path order; empty when it is valid."""
    if not isinstance(data, Mapping):
        return [ManifestError("", f"expected a table, got {toml_type(data)}")]
    version = data.get("schema_version")
    # A newer format may mean anything: its other keys are not ours to judge.
    if (
        isinstance(version, int)
        and not isinstance(version, bool)
        and version not in SUPPORTED_SCHEMA_VERSIONS
    ):
        return [ManifestError("schema_version", unsupported_version_message(version))]
    found = _document_problems(data)
    environments = data.get("environments")
    if isinstance(environments, Mapping):
        known = {loc for loc, _ in found}
        base = {k: v for k, v in data.items() if k != "environments"}
        base.setdefault("processes", {DEFAULT_PROCESS: None})
        for name, override in environments.items():
            if not isinstance(override, Mapping) or any(
                loc[:2] == ("environments", name) for loc in known
            ):
                continue  # its own problems are reported; the merge would only repeat them
            for loc, message in _document_problems(_merge(base, override)):
                if loc not in known:
                    found.append((("environments", name, *loc), message))
    return _errors(found)


def _document_problems(doc: Mapping[str, Any]) -> list[Problem]:
    found = structural(doc)
    return found + cross_field(doc, found)


def _errors(problems: list[Problem]) -> list[ManifestError]:
    unique = dict.fromkeys(problems)
    ordered = sorted(unique, key=lambda p: sort_key(p[0]))
    return [ManifestError(render_path(loc), message) for loc, message in ordered]


def _load_toml(text: str, source: str) -> dict[str, Any]:
    def fail(message: str, offset: int | None = None) -> ManifestInvalid:
        if offset is None:
            return ManifestInvalid.of([ManifestError("", message)], source=source)
        line, column = _position(text, offset)
        return ManifestInvalid.of([ManifestError("", message, line, column)], source=source)

    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise fail("not valid Unicode text (a lone surrogate)", exc.start) from None
    if size > MAX_MANIFEST_BYTES:
        raise fail(f"the manifest is larger than {MAX_MANIFEST_BYTES // 1024} KiB")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(str(exc), text, source) from None
    except RecursionError:
        raise fail("values are nested too deeply") from None
    except ValueError as exc:  # tomllib lets int() refuse numbers of over 4300 digits
        raise fail(f"invalid value: {exc}") from None


def _syntax_error(message: str, text: str, source: str) -> ManifestInvalid:
    m = _TOML_POSITION.match(message)
    if m is None:
        line, column, what = *_position(text, len(text)), message
    elif m.group("line"):
        line, column, what = int(m.group("line")), int(m.group("col")), m.group("msg")
    else:
        line, column, what = *_position(text, len(text)), m.group("msg")
    what = what[:1].lower() + what[1:]
    return ManifestInvalid.of([ManifestError("", what, line, column)], source=source)


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``text[offset]``."""
    before = text[:offset]
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1


# -- environments ------------------------------------------------------------------------


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        current = out.get(key)
        if key in _MERGED_TABLES and isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = {**current, **value}
        else:
            out[key] = value
    return out


def _override_data(override: EnvironmentOverride) -> dict[str, Any]:
    """What the override sets: tables with their set keys only, arrays of tables whole
    (defaults filled in each element)."""
    partial = override.model_dump(mode="json", exclude_unset=True)
    full = override.model_dump(mode="json")
    return {key: full[key] if key in _ARRAYS else partial[key] for key in partial}


def for_environment(manifest: Manifest, env: str) -> Manifest:
    """The manifest an app runs with in environment ``env``: the base (defaults filled)
    with ``[environments.<env>]`` merged over it, and no ``environments``. An environment
    without overrides gets the base."""
    if not isinstance(env, str) or not ENV_NAME_RE.match(env):
        raise ValidationFailed(
            f"invalid environment name {env!r}",
            hint="use 1-20 characters: lowercase letters, digits and '-', starting with a "
            "letter and not ending with '-'",
            detail={"field": "env"},
        )
    base = manifest.model_dump(mode="json", exclude={"environments"})
    override = manifest.environments.get(env)
    return validate_manifest(_merge(base, _override_data(override)) if override else base)


# -- normalization and hash --------------------------------------------------------------


def normalize(manifest: Manifest) -> dict[str, Any]:
    """The canonical document (docs/specs/manifest.md, "Normalization"): every default
    filled, durations in canonical spelling, commands as arrays, arrays of tables in
    canonical order, keys sorted. It is itself a valid manifest that normalizes to itself."""
    data = _canonical(manifest.model_dump(mode="json", exclude={"environments"}))
    data["vm"] = _canonical_vm(data["vm"], declared=sorted(data["processes"]))
    data["environments"] = {
        name: _canonical(_override_data(override))
        for name, override in manifest.environments.items()
    }
    result: dict[str, Any] = _sorted(data)
    return result


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text as is: one spelling per document."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def manifest_hash(manifest: Manifest) -> str:
    """``sha256:<hex>`` of the UTF-8 canonical JSON of the normalized manifest."""
    digest = hashlib.sha256(canonical_json(normalize(manifest)).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"


def _canonical(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if out.get("services") is not None:
        services = [
            {**s, "checks": sorted(s["checks"], key=canonical_json)} for s in out["services"]
        ]
        out["services"] = sorted(services, key=lambda s: (s["process"], s["internal_port"]))
    if out.get("vm") is not None:
        out["vm"] = _canonical_vm(out["vm"], declared=[])
    if out.get("mounts") is not None:
        mounts = [{**m, "processes": sorted(set(m["processes"]))} for m in out["mounts"]]
        out["mounts"] = sorted(mounts, key=lambda m: (m["path"], m["volume"], m["processes"]))
    return out


def _canonical_vm(groups: list[dict[str, Any]], declared: list[str]) -> list[dict[str, Any]]:
    """One group per distinct size (a group only sizes its processes), each process
    sized once; ``declared`` processes in no group get the default size."""
    by_size: dict[tuple[int, int], set[str]] = {}
    for group in groups:
        by_size.setdefault((group["cpus"], group["memory_mb"]), set()).update(group["processes"])
    sized = set().union(*by_size.values()) if by_size else set()
    unsized = {p for p in declared if p not in sized}
    if unsized:
        by_size.setdefault((DEFAULT_CPUS, DEFAULT_MEMORY_MB), set()).update(unsized)
    merged = [
        {"processes": sorted(names), "cpus": cpus, "memory_mb": memory}
        for (cpus, memory), names in by_size.items()
    ]
    return sorted(merged, key=lambda g: (g["processes"], g["cpus"], g["memory_mb"]))


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


# -- JSON Schema -------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``ember.toml`` (docs/specs/manifest.schema.json), generated from
    the model. It describes shapes and per-field limits; the rules between fields are in
    docs/specs/manifest.md only."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "description": "ember.toml, schema_version 1. Generated from ember.core.manifest "
        "('make manifest-schema'); docs/specs/manifest.md is the contract, including the "
        "rules between fields that a JSON Schema cannot express.",
    }


def render_json_schema() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
