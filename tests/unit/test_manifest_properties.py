"""Properties of the manifest (docs/specs/manifest.md) over generated documents:

- normalizing is idempotent, and the normalized form is itself a valid manifest;
- the hash ignores key order, table order, equivalent spellings and whitespace;
- every valid manifest satisfies the published JSON Schema;
- fuzzing: whatever the input, parsing only ever fails with ManifestInvalid.
"""

from __future__ import annotations

import functools
import json
import random
import shlex
import string
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.core.manifest import (
    ManifestInvalid,
    for_environment,
    format_duration,
    json_schema,
    manifest_hash,
    normalize,
    parse_manifest,
    validate_manifest,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(
    max_examples=750,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: A seeded generator for choices that need no shrinking (hypothesis's own st.randoms()
#: costs a draw per call, which made these tests ten times slower).
seeds = st.integers(0, 2**32 - 1).map(random.Random)

PROCESS_NAMES = ["web", "worker", "admin", "cron", "api-v2"]
SIGNALS = ["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGKILL"]

# -- valid documents ---------------------------------------------------------------------

words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(" \t'\"\\$"),
    max_size=12,
)
env_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=20,
)
env_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,12}\Z").filter(
    lambda n: not n.upper().startswith("EMBER_")
)


@st.composite
def commands(draw: st.DrawFn) -> list[str]:
    first = draw(words.filter(bool))
    return [first, *draw(st.lists(words, max_size=4))]


@st.composite
def durations(draw: st.DrawFn, lo: int, hi: int) -> int:
    """Milliseconds, biased towards the round values people write."""
    unit = draw(st.sampled_from([u for u in (1, 100, 1000, 60_000) if -(-lo // u) <= hi // u]))
    return draw(st.integers(-(-lo // unit), hi // unit)) * unit


@st.composite
def checks(draw: st.DrawFn, protocol: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["tcp", "exec"] + (["http"] if protocol == "tcp" else [])))
    check: dict[str, Any] = {"type": kind}
    if kind == "http":
        check["path"] = draw(st.sampled_from(["/", "/healthz", "/a/b?c=d"]))
    if kind == "exec":
        check["command"] = draw(commands())
    interval = draw(durations(1000, 3_600_000))
    check["interval"] = interval
    check["timeout"] = draw(durations(100, interval))
    check["grace_period"] = draw(durations(0, 3_600_000))
    return check


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid manifest as plain data, durations in milliseconds (``spell`` writes them)."""
    doc: dict[str, Any] = {"schema_version": 1, "app": draw(st.sampled_from(["hello", "a", "x-1"]))}
    if draw(st.booleans()):
        doc["org"] = "acme"
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(PROCESS_NAMES), min_size=1, max_size=4, unique=True))
        doc["processes"] = {n: draw(commands()) for n in names}
    else:
        names = ["web"]
    services, used = [], set()
    for _ in range(draw(st.integers(0, 3))):
        process = draw(st.sampled_from(names))
        port = draw(st.integers(1, 65535))
        if (process, port) in used:
            continue
        used.add((process, port))
        protocol = draw(st.sampled_from(["tcp", "tls"]))
        services.append(
            {
                "process": process,
                "internal_port": port,
                "protocol": protocol,
                "checks": draw(st.lists(checks(protocol), max_size=2)),
            }
        )
    if services:
        doc["services"] = services
    sized = draw(st.lists(st.sampled_from(names), unique=True))
    if sized:
        groups: dict[int, list[str]] = {}
        for name in sized:
            groups.setdefault(draw(st.integers(0, 2)), []).append(name)
        doc["vm"] = [
            {
                "processes": members,
                "cpus": draw(st.integers(1, 16)),
                "memory_mb": draw(st.integers(2, 512)) * 64,
            }
            for members in groups.values()
        ]
    mounts, taken = [], set()
    for i in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(["/data", "/srv/data", "/var/lib/x", "/ü"]))
        members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
        if any((m, path) in taken for m in members):
            continue
        taken.update((m, path) for m in members)
        mounts.append({"volume": f"vol{i}", "path": path, "processes": members})
    if mounts:
        doc["mounts"] = mounts
    strategies = ["rolling", "immediate"] + ([] if mounts else ["canary", "bluegreen"])
    if draw(st.booleans()):
        surge = draw(st.integers(0, 100))
        deploy = {
            "strategy": draw(st.sampled_from(strategies)),
            "max_surge": surge,
            "max_unavailable": draw(st.integers(0 if surge else 1, 100)),
            "kill_signal": draw(st.sampled_from(SIGNALS)),
            "kill_timeout": draw(durations(1000, 300_000)),
        }
        if draw(st.booleans()):
            deploy["release_command"] = draw(commands())
        doc["deploy"] = deploy
    if draw(st.booleans()):
        doc["restart"] = {
            "policy": draw(st.sampled_from(["no", "always", "on-failure"])),
            "max_retries": draw(st.integers(0, 1000)),
        }
    if draw(st.booleans()):
        doc["env"] = draw(st.dictionaries(env_names, env_values, max_size=4))
    environments: dict[str, Any] = {}
    for env in draw(st.lists(st.sampled_from(["staging", "prod", "qa-1"]), unique=True)):
        override: dict[str, Any] = {}
        if draw(st.booleans()):
            override["env"] = draw(st.dictionaries(env_names, env_values, max_size=2))
        if draw(st.booleans()):
            override["deploy"] = {
                "strategy": draw(st.sampled_from(["rolling", "immediate"])),
                "max_surge": draw(st.integers(1, 5)),
            }
        if draw(st.booleans()):
            override["restart"] = {"max_retries": draw(st.integers(0, 9))}
        environments[env] = override
    if environments:
        doc["environments"] = environments
    return doc


def random_manifest(rng: random.Random) -> dict[str, Any]:
    """Like :func:`manifests`, from a plain seeded generator: much cheaper to make, for
    the fuzz tests that need thousands (hypothesis then drives the mutations)."""
    chars = string.ascii_letters + string.digits + " '\"\\$-_/=.é✓中\u2028\x85"

    def word(min_size: int = 0) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(min_size, 8)))

    def command() -> list[str]:
        return [word(1)] + [word() for _ in range(rng.randint(0, 3))]

    def duration(lo: int, hi: int) -> int:
        unit = rng.choice([u for u in (1, 100, 1000, 60_000) if -(-lo // u) <= hi // u])
        return rng.randint(-(-lo // unit), hi // unit) * unit

    doc: dict[str, Any] = {"schema_version": 1, "app": rng.choice(["hello", "a", "x-1"])}
    names = ["web"]
    if rng.random() < 0.7:
        names = rng.sample(PROCESS_NAMES, rng.randint(1, 4))
        doc["processes"] = {n: command() for n in names}
    services, used = [], set()
    for _ in range(rng.randint(0, 3)):
        process, port = rng.choice(names), rng.randint(1, 65535)
        if (process, port) in used:
            continue
        used.add((process, port))
        protocol = rng.choice(["tcp", "tls"])
        service_checks = []
        for _ in range(rng.randint(0, 2)):
            kind = rng.choice(["tcp", "exec"] + (["http"] if protocol == "tcp" else []))
            interval = duration(1000, 3_600_000)
            check: dict[str, Any] = {
                "type": kind,
                "interval": interval,
                "timeout": duration(100, interval),
                "grace_period": duration(0, 3_600_000),
            }
            if kind == "http":
                check["path"] = rng.choice(["/", "/healthz"])
            if kind == "exec":
                check["command"] = command()
            service_checks.append(check)
        services.append(
            {
                "process": process,
                "internal_port": port,
                "protocol": protocol,
                "checks": service_checks,
            }
        )
    if services:
        doc["services"] = services
    sized = rng.sample(names, rng.randint(0, len(names)))
    if sized:
        cut = rng.randint(1, len(sized))
        doc["vm"] = [
            {"processes": part, "cpus": rng.randint(1, 16), "memory_mb": rng.randint(2, 512) * 64}
            for part in (sized[:cut], sized[cut:])
            if part
        ]
    if rng.random() < 0.4:
        doc["mounts"] = [{"volume": "data", "path": "/data", "processes": [rng.choice(names)]}]
    if rng.random() < 0.6:
        doc["deploy"] = {
            "strategy": rng.choice(["rolling", "immediate"]),
            "max_surge": rng.randint(1, 100),
            "max_unavailable": rng.randint(0, 100),
            "kill_signal": rng.choice(SIGNALS),
            "kill_timeout": duration(1000, 300_000),
            "release_command": command(),
        }
    if rng.random() < 0.5:
        doc["restart"] = {"policy": rng.choice(["no", "always"]), "max_retries": rng.randint(0, 9)}
    if rng.random() < 0.5:
        doc["env"] = {f"V{i}": word() for i in range(rng.randint(0, 3))}
    if rng.random() < 0.5:
        doc["environments"] = {
            "staging": {"env": {"V0": word()}, "deploy": {"strategy": "immediate"}},
            "qa": {"restart": {"max_retries": rng.randint(0, 9)}},
        }
    return doc


# -- equivalent spellings ----------------------------------------------------------------

DURATION_KEYS = {"interval", "timeout", "grace_period", "kill_timeout"}


def spell(doc: Any, rng: random.Random, *, canonical: bool = False) -> Any:
    """``doc`` written another way that means the same: keys and unordered arrays
    shuffled, vm groups split, commands as strings, durations spelled differently, and
    defaults left out or spelled out. ``canonical``: only durations as strings."""
    if isinstance(doc, list):
        return [spell(v, rng, canonical=canonical) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "env":
            out[key] = dict(value)  # variables: names are data, not keys of the format
        elif key in DURATION_KEYS and isinstance(value, int):
            out[key] = _spell_duration(value, rng, canonical)
        elif key in ("command", "release_command") and not canonical and rng.random() < 0.5:
            out[key] = shlex.join(value)
        elif key == "processes" and isinstance(value, dict):
            out[key] = {
                k: shlex.join(v) if not canonical and rng.random() < 0.5 else v
                for k, v in value.items()
            }
        elif key in ("services", "mounts", "checks", "vm") and not canonical:
            items = [_defaults(spell(v, rng), rng) for v in value]
            if key == "vm":
                items = _split_groups(items, rng)
            rng.shuffle(items)
            out[key] = items
        elif key == "processes" and isinstance(value, list) and not canonical:
            out[key] = rng.sample(value, len(value))
        else:
            out[key] = spell(value, rng, canonical=canonical)
    if not canonical:
        keys = list(out)
        rng.shuffle(keys)
        out = {k: out[k] for k in keys}
    return out


def _spell_duration(millis: int, rng: random.Random, canonical: bool) -> str:
    choices = [format_duration(millis)]
    if not canonical:
        choices.append(f"{millis}ms")
        if millis % 1000 == 0:
            choices.append(f"{millis // 1000}s")
        if millis % 60_000 == 0:
            choices.append(f"{millis // 60_000}m")
    return rng.choice(choices)


def _split_groups(groups: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """A group sizes each of its processes: one group of two is two groups of one."""
    out = []
    for group in groups:
        if len(group["processes"]) > 1 and rng.random() < 0.5:
            out += [{**group, "processes": [p]} for p in group["processes"]]
        else:
            out.append(group)
    return out


_DEFAULTS = {"protocol": "tcp", "type": "tcp", "process": "web"}


def _defaults(table: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = dict(table)
    for key, default in _DEFAULTS.items():
        if out.get(key) == default and rng.random() < 0.5:
            del out[key]
    if out.get("type") == "http" and out.get("path") == "/" and rng.random() < 0.5:
        del out["path"]
    if out.get("processes") == ["web"] and "volume" in out and rng.random() < 0.5:
        del out["processes"]
    return out


# -- TOML writing with random layout -----------------------------------------------------


def _string(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("\x7f", "\\u007f")  # DEL is a control character in TOML, not in JSON


def _key(key: str) -> str:
    bare = key and all(c in string.ascii_letters + string.digits + "_-" for c in key)
    return key if bare else _string(key)


def inline(value: Any, rng: random.Random) -> str:
    sp = rng.choice(["", " ", "  ", "\t"])
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + sp + f",{sp}".join(inline(v, rng) for v in value) + sp + "]"
    parts = [f"{_key(k)}{sp}={sp}{inline(v, rng)}" for k, v in value.items()]
    return "{" + sp + f",{sp}".join(parts) + sp + "}"


def to_toml(doc: dict[str, Any], rng: random.Random) -> str:
    """TOML for ``doc``: each table either inline or written by tomli_w as [headers], with
    whitespace, blank lines and comments sprinkled where TOML allows them."""
    inline_parts, table_parts = [], []
    for key, value in doc.items():
        written = tomli_w.dumps({key: value}) if isinstance(value, (dict, list)) else ""
        if written.startswith("[") and rng.random() < 0.5:
            table_parts.append(written)
        else:
            inline_parts.append(f"{_key(key)} = {inline(value, rng)}\n")
    rng.shuffle(inline_parts)
    rng.shuffle(table_parts)
    lines = "".join(inline_parts + table_parts).rstrip("\n").split("\n")
    out = []
    for line in lines:
        if rng.random() < 0.2:
            out.append(rng.choice(["", "   ", "# a comment", "\t# [not = a table]"]))
        out.append(rng.choice(["", " ", "\t"]) + line + rng.choice(["", "  ", " # trailing"]))
    return "\n".join(out) + rng.choice(["", "\n", "\n\n"])


# -- properties --------------------------------------------------------------------------


@PROPERTY
@given(doc=manifests(), seed=seeds)
def test_normalizing_twice_equals_once(doc: dict[str, Any], seed: random.Random) -> None:
    manifest = validate_manifest(spell(doc, seed, canonical=True))
    once = normalize(manifest)
    again = validate_manifest(once)  # the normalized form is a valid manifest...
    assert normalize(again) == once  # ...and a fixpoint
    assert manifest_hash(again) == manifest_hash(manifest)


@PROPERTY
@given(
    doc=manifests(),
    first=seeds,
    second=seeds,
)
def test_hash_ignores_order_spelling_and_whitespace(
    doc: dict[str, Any], first: random.Random, second: random.Random
) -> None:
    reference = validate_manifest(spell(doc, first, canonical=True))
    a = parse_manifest(to_toml(spell(doc, first), first))
    b = parse_manifest(to_toml(spell(doc, second), second))
    assert manifest_hash(a) == manifest_hash(b) == manifest_hash(reference)
    assert normalize(a) == normalize(b)
    for env in doc.get("environments", {}):
        assert manifest_hash(for_environment(a, env)) == manifest_hash(for_environment(b, env))


@PROPERTY
@given(doc=manifests(), seed=seeds)
def test_hash_sees_every_meaningful_change(doc: dict[str, Any], seed: random.Random) -> None:
    manifest = validate_manifest(spell(doc, seed, canonical=True))
    changed = {**normalize(manifest), "app": "changed"}
    assert manifest_hash(validate_manifest(changed)) != manifest_hash(manifest)
    added = {**manifest.env, "ADDED": manifest.env.get("ADDED", "") + "x"}
    env = {**changed, "app": manifest.app, "env": added}
    assert manifest_hash(validate_manifest(env)) != manifest_hash(manifest)


@functools.cache
def _schema_validator() -> Any:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    return jsonschema_rs.validator_for(json_schema())


@PROPERTY
@given(doc=manifests(), seed=seeds)
def test_valid_manifests_satisfy_the_json_schema(doc: dict[str, Any], seed: random.Random) -> None:
    validator = _schema_validator()
    written = spell(doc, seed, canonical=True)
    validate_manifest(written)
    assert validator.is_valid(written), list(validator.iter_errors(written))[:3]
    normalized = normalize(validate_manifest(written))
    assert validator.is_valid(normalized), list(validator.iter_errors(normalized))[:3]


# -- fuzzing: only ManifestInvalid, never a crash ----------------------------------------

KEYS = [
    "schema_version", "app", "org", "processes", "services", "vm", "deploy", "restart",
    "env", "mounts", "environments", "process", "internal_port", "protocol", "checks",
    "type", "path", "command", "interval", "timeout", "grace_period", "cpus", "memory_mb",
    "strategy", "max_surge", "max_unavailable", "kill_signal", "kill_timeout",
    "release_command", "policy", "max_retries", "volume", "web", "staging", "EMBER_X",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["10s", "0s", "1m30s", "web", "tcp", "http", "/data", "SIGTERM", "1"])
    | st.dates()
    | st.datetimes()
    | st.times()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


def _parse_or_invalid(text: str) -> None:
    try:
        manifest = parse_manifest(text)
    except ManifestInvalid as exc:
        assert exc.errors and all(str(e) for e in exc.errors)
        return
    _use(manifest)


def _validate_or_invalid(data: Any) -> None:
    try:
        manifest = validate_manifest(data)
    except ManifestInvalid as exc:
        assert exc.errors
        return
    _use(manifest)


def _use(manifest: Any) -> None:
    """A manifest that parsed works everywhere: normalize, hash, every environment."""
    assert normalize(validate_manifest(normalize(manifest))) == normalize(manifest)
    assert manifest_hash(manifest).startswith("sha256:")
    for env in manifest.environments:
        manifest_hash(for_environment(manifest, env))


TOMLISH = st.text(
    alphabet=st.sampled_from([*"[]{}=\"'.,#\n\t -_:+0123456789abcdefstvwxyz\\", "\ud800", "\x00"])
    | st.characters(),
    max_size=200,
)


@FUZZ
@given(text=TOMLISH)
def test_fuzz_random_text(text: str) -> None:
    _parse_or_invalid(text)
    _parse_or_invalid("schema_version = 1\napp = 'a'\n" + text)


@FUZZ
@given(seed=seeds, edits=st.data())
def test_fuzz_mutated_valid_manifests(seed: random.Random, edits: st.DataObject) -> None:
    text = to_toml(spell(random_manifest(seed), seed), seed)
    _parse_or_invalid(text)  # unmutated: valid
    for _ in range(edits.draw(st.integers(1, 4))):
        i = edits.draw(st.integers(0, len(text)))
        j = edits.draw(st.integers(i, min(len(text), i + 20)))
        action = edits.draw(st.sampled_from(["delete", "insert", "replace", "dup-line"]))
        if action == "delete":
            text = text[:i] + text[j:]
        elif action == "insert":
            text = text[:i] + edits.draw(TOMLISH.map(lambda s: s[:10])) + text[i:]
        elif action == "replace":
            text = (
                text[:i]
                + edits.draw(st.sampled_from(['"x"', "0", "[]", "{}", "-1", "\n[a]\n"]))
                + text[j:]
            )
        else:
            lines = text.splitlines(keepends=True) or [""]
            k = i % len(lines)
            text = "".join(lines[: k + 1] + lines[k:])
    _parse_or_invalid(text)


@FUZZ
@given(data=values)
def test_fuzz_random_documents(data: Any) -> None:
    _validate_or_invalid(data)
    if isinstance(data, dict):
        _validate_or_invalid({"schema_version": 1, "app": "a", **data})
        try:
            text = tomli_w.dumps(data)
        except (TypeError, ValueError):
            return  # not representable as TOML (None, NaN keys, ...)
        _parse_or_invalid(text)


@FUZZ
@given(seed=seeds, data=st.data())
def test_fuzz_valid_manifests_with_one_value_replaced(
    seed: random.Random, data: st.DataObject
) -> None:
    written = spell(random_manifest(seed), seed)
    validate_manifest(written)  # before the change: valid
    node: Any = written
    while True:  # walk to a random place and put a random value there
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(values)
        break
    _validate_or_invalid(written)
