"""The manifest's pure API (docs/specs/manifest.md): errors, parsing limits, durations,
normalization, the hash, environments. Messages are pinned by the goldens
(test_manifest_golden.py); generated inputs by test_manifest_properties.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.cli.exits import Exit, exit_code_for
from ember.core.errors import Kind, ValidationFailed
from ember.core.manifest import (
    MAX_MANIFEST_BYTES,
    ManifestError,
    ManifestInvalid,
    canonical_json,
    for_environment,
    format_duration,
    manifest_hash,
    normalize,
    parse_duration,
    parse_manifest,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
HEAD = 'schema_version = 1\napp = "hello"\n'


def errors_of(text: str) -> list[str]:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(text)
    return [str(e) for e in info.value.errors]


# -- the error -----------------------------------------------------------------------------


def test_manifest_invalid_is_a_validation_error_with_every_problem() -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(HEAD + "[deploy]\nstratgy = 1\n[restart]\npolicy = 'never'\n")
    exc = info.value
    assert isinstance(exc, ValidationFailed)
    assert exc.code == "manifest.invalid" and exc.kind is Kind.INVALID
    assert exit_code_for(exc) is Exit.USAGE  # exit 2
    assert exc.detail == {
        "source": "ember.toml",
        "errors": [
            {"path": "deploy.stratgy", "message": 'unknown field (did you mean "strategy"?)'},
            {
                "path": "restart.policy",
                "message": 'expected one of "no", "always", "on-failure", got "never"',
            },
        ],
    }
    lines = exc.message.splitlines()
    assert lines[0] == "ember.toml is not a valid manifest (2 errors):"
    assert lines[1:] == [str(e) for e in exc.errors]
    assert exc.hint and "docs/specs/manifest.md" in exc.hint
    assert exc.to_dict()["code"] == "manifest.invalid"


def test_manifest_invalid_also_takes_the_usual_arguments() -> None:
    """Callers outside this module may raise it like any EmberError."""
    exc = ManifestInvalid(
        "the manifest is for app 'a', not 'b'",
        hint="fix it",
        detail={"errors": [{"path": "app", "message": "expected 'b'"}]},
    )
    assert exc.errors == [ManifestError("app", "expected 'b'")]
    assert ManifestInvalid("no detail").errors == []


def test_the_source_names_the_file() -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest("app = 1", source="deploy/ember.toml")
    assert info.value.message.startswith("deploy/ember.toml is not a valid manifest (2 errors)")
    assert info.value.detail["source"] == "deploy/ember.toml"


def test_syntax_errors_give_line_and_column() -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(HEAD + "[deploy]\nstrategy = rolling\n")
    (error,) = info.value.errors
    assert (error.line, error.column, error.path) == (4, 12, "")
    assert str(error) == "line 4, column 12: invalid value"
    assert info.value.detail["errors"] == [
        {"path": "", "message": "invalid value", "line": 4, "column": 12}
    ]
    assert errors_of('app = "x') == ["line 1, column 9: unterminated string"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD + 'env.X = "\ud800"\n', "line 3, column 10: not valid Unicode text"),
        ("x = " + "[" * 5000 + "]" * 5000, "values are nested too deeply"),
        ("x = " + "9" * 5000, "invalid value: Exceeds the limit"),
        ("# " + "x" * MAX_MANIFEST_BYTES, "the manifest is larger than 1024 KiB"),
    ],
)
def test_inputs_the_toml_parser_cannot_take_are_manifest_errors(text: str, message: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith(message)


def test_a_document_that_is_not_a_table() -> None:
    with pytest.raises(ManifestInvalid) as info:
        validate_manifest(["not", "a", "table"])  # type: ignore[arg-type]
    assert [str(e) for e in info.value.errors] == ["expected a table, got an array"]


def test_a_newer_schema_version_reports_only_that() -> None:
    assert errors_of("schema_version = 3\nnew_key = true\n") == [
        "schema_version: unsupported schema_version 3: this version of ember reads "
        "schema_version 1; upgrade ember to read newer manifests"
    ]


def test_unknown_keys_everywhere_suggest_the_right_one() -> None:
    text = (
        HEAD
        + "procesess = {}\n"
        + "[[services]]\ninternal_prot = 1\n[[vm]]\nprocesses = ['web']\nmemory = 256\n"
        + "[[mounts]]\nvolume = 'v'\npath = '/v'\nproccesses = ['web']\n"
        + "[environments.prod]\nenviron = {}\n"
    )
    assert errors_of(text) == [
        'environments.prod.environ: unknown field (did you mean "env"?)',
        'mounts[0].proccesses: unknown field (did you mean "processes"?)',
        'procesess: unknown field (did you mean "processes"?)',
        "services[0].internal_port: missing required field",
        'services[0].internal_prot: unknown field (did you mean "internal_port"?)',
        'vm[0].memory: unknown field (did you mean "memory_mb"?)',
    ]


def test_a_broken_value_does_not_hide_the_rules_of_its_neighbours() -> None:
    """Cross-field rules still judge every value that is itself valid."""
    text = (
        HEAD
        + "[processes]\nweb = 'serve'\n"
        + "[[services]]\nprocess = 'wbe'\ninternal_port = 8080\nprotocol = 'udp'\n"
        + "[[vm]]\nprocesses = ['nope']\ncpus = 99\n"
        + "[deploy]\nmax_surge = 0\nmax_unavailable = 0\nkill_signal = 'TERM'\n"
    )
    assert errors_of(text) == [
        'deploy.kill_signal: unknown signal "TERM" (did you mean "SIGTERM"?); use one of '
        "SIGABRT, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH",
        "deploy.max_surge: max_surge and max_unavailable are both 0, so a rolling deploy "
        "could never replace an instance; set max_surge = 1 (or max_unavailable = 1)",
        'services[0].process: unknown process "wbe" (did you mean "web"?); declared in '
        "[processes]: web",
        'services[0].protocol: expected one of "tcp", "tls", got "udp"',
        "vm[0].cpus: must be between 1 and 16, got 99",
        'vm[0].processes[0]: unknown process "nope"; declared in [processes]: web',
    ]


def test_a_failed_value_is_never_judged_again() -> None:
    """A port that failed its own rule is not also reported as a duplicate."""
    text = HEAD + "[[services]]\ninternal_port = 0\n[[services]]\ninternal_port = 0\n"
    assert errors_of(text) == [
        "services[0].internal_port: must be between 1 and 65535, got 0",
        "services[1].internal_port: must be between 1 and 65535, got 0",
    ]


def test_the_same_port_on_two_processes_is_fine() -> None:
    """Each process runs in its own microVMs: ports collide only within a process."""
    parse_manifest(
        HEAD
        + "[processes]\nweb = 'a'\nadmin = 'b'\n"
        + "[[services]]\ninternal_port = 8080\n"
        + "[[services]]\nprocess = 'admin'\ninternal_port = 8080\n"
    )


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "millis", "canonical"),
    [
        ("0s", 0, "0s"),
        ("500ms", 500, "500ms"),
        ("1500ms", 1500, "1s500ms"),
        ("10s", 10_000, "10s"),
        ("90s", 90_000, "1m30s"),
        ("1m30s", 90_000, "1m30s"),
        ("2h", 7_200_000, "2h"),
        ("1h1m1s1ms", 3_661_001, "1h1m1s1ms"),
        ("60m", 3_600_000, "1h"),
    ],
)
def test_durations(text: str, millis: int, canonical: str) -> None:
    assert parse_duration(text) == millis
    assert format_duration(millis) == canonical
    assert parse_duration(canonical) == millis


@pytest.mark.parametrize("text", ["", "10", "1.5s", "1s1m", "s", "-1s", "1 s", "10S", "1d"])
def test_invalid_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- normalization and the hash ----------------------------------------------------------


def test_normalize_fills_every_default() -> None:
    doc = normalize(parse_manifest(HEAD))
    assert doc == {
        "schema_version": 1,
        "app": "hello",
        "org": None,
        "processes": {"web": None},
        "services": [],
        "vm": [{"processes": ["web"], "cpus": 1, "memory_mb": 256}],
        "deploy": {
            "strategy": "rolling",
            "max_surge": 1,
            "max_unavailable": 0,
            "kill_signal": "SIGTERM",
            "kill_timeout": "5s",
            "release_command": None,
        },
        "restart": {"policy": "on-failure", "max_retries": 10},
        "env": {},
        "mounts": [],
        "environments": {},
    }
    assert list(doc) == sorted(doc)


def test_normalize_puts_arrays_in_canonical_order() -> None:
    manifest = parse_manifest(
        HEAD
        + "[processes]\nweb = 'httpd -f'\nworker = ['work', '--fast']\ncron = 'tick'\n"
        + "[[services]]\nprocess = 'worker'\ninternal_port = 9\n"
        + "[[services]]\ninternal_port = 80\n"
        + "  [[services.checks]]\n  type = 'http'\n  interval = '90s'\n"
        + "  [[services.checks]]\n  type = 'exec'\n  command = 'true'\n"
        + "[[vm]]\nprocesses = ['worker']\ncpus = 2\n"
        + "[[vm]]\nprocesses = ['cron']\ncpus = 2\n"
        + "[[mounts]]\nvolume = 'b'\npath = '/b'\nprocesses = ['worker', 'web']\n"
        + "[[mounts]]\nvolume = 'a'\npath = '/a'\n"
    )
    doc = normalize(manifest)
    assert doc["processes"] == {
        "cron": ["tick"],
        "web": ["httpd", "-f"],
        "worker": ["work", "--fast"],
    }
    assert [(s["process"], s["internal_port"]) for s in doc["services"]] == [
        ("web", 80),
        ("worker", 9),
    ]
    assert [c["type"] for c in doc["services"][0]["checks"]] == ["exec", "http"]
    http = doc["services"][0]["checks"][1]
    assert (http["path"], http["interval"]) == ("/", "1m30s")
    assert doc["vm"] == [  # one group per size; the unlisted process gets the default
        {"processes": ["cron", "worker"], "cpus": 2, "memory_mb": 256},
        {"processes": ["web"], "cpus": 1, "memory_mb": 256},
    ]
    assert [(m["path"], m["processes"]) for m in doc["mounts"]] == [
        ("/a", ["web"]),
        ("/b", ["web", "worker"]),
    ]


def test_the_hash_is_sha256_of_the_canonical_json() -> None:
    import hashlib

    manifest = parse_manifest(HEAD + "[env]\nGREETING = 'héllo'\n")
    text = canonical_json(normalize(manifest))
    assert '"GREETING":"héllo"' in text and ", " not in text and ": " not in text
    assert manifest_hash(manifest) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_the_hash_ignores_comments_order_and_spelling() -> None:
    a = parse_manifest(
        HEAD
        + "[deploy]\nkill_timeout = '90s'\nstrategy = 'rolling'\n"
        + "[processes]\nweb = 'httpd -f -p 8080'\n"
        + "[[vm]]\nprocesses = ['web']\n"
    )
    b = parse_manifest(
        "# comment\napp = 'hello'\nschema_version = 1\n"
        + "processes = { web = ['httpd', '-f', '-p', '8080'] }\n"
        + "deploy = { kill_timeout = '1m30s' }\n"
    )
    assert manifest_hash(a) == manifest_hash(b)
    c = parse_manifest(HEAD + "[processes]\nweb = 'httpd -f -p 8081'\n")
    assert manifest_hash(c) != manifest_hash(b)


# -- environments ------------------------------------------------------------------------

ENVS = (
    HEAD
    + "[processes]\nweb = 'serve'\n"
    + "[[services]]\ninternal_port = 8080\n"
    + "[deploy]\nstrategy = 'rolling'\nmax_surge = 2\n"
    + "[env]\nA = '1'\nB = '2'\n"
    + "[environments.staging]\n"
    + "deploy.strategy = 'immediate'\n"
    + "env = { B = 'staging', C = '3' }\n"
    + "processes.worker = 'work'\n"
    + "services = [{ internal_port = 9090 }]\n"
)


def test_an_environment_merges_tables_and_replaces_arrays() -> None:
    staging = for_environment(parse_manifest(ENVS), "staging")
    assert staging.deploy.strategy == "immediate" and staging.deploy.max_surge == 2
    assert staging.env == {"A": "1", "B": "staging", "C": "3"}
    assert staging.processes == {"web": ["serve"], "worker": ["work"]}
    assert [s.internal_port for s in staging.services] == [9090]
    assert staging.environments == {}


def test_an_environment_without_overrides_is_the_base() -> None:
    manifest = parse_manifest(ENVS)
    prod = for_environment(manifest, "prod")
    base = parse_manifest(ENVS.split("[environments.staging]")[0])
    assert normalize(prod) == normalize(base)
    assert manifest_hash(prod) == manifest_hash(base) != manifest_hash(manifest)


def test_overrides_apply_after_the_base_defaults() -> None:
    """Without [processes] the base runs the image as "web"; an environment adding a
    process keeps it."""
    manifest = parse_manifest(HEAD + "[environments.staging]\nprocesses.worker = 'work'\n")
    assert for_environment(manifest, "staging").processes == {"web": None, "worker": ["work"]}


def test_an_invalid_environment_name() -> None:
    with pytest.raises(ValidationFailed) as info:
        for_environment(parse_manifest(HEAD), "Prod")
    assert info.value.detail == {"field": "env"}


def test_the_normalized_override_holds_only_what_it_sets() -> None:
    doc = normalize(parse_manifest(ENVS))
    assert doc["environments"]["staging"] == {
        "deploy": {"strategy": "immediate"},
        "env": {"B": "staging", "C": "3"},
        "processes": {"worker": ["work"]},
        "services": [{"process": "web", "internal_port": 9090, "protocol": "tcp", "checks": []}],
    }


# -- files others own --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples").glob("*/ember.toml")), ids=lambda p: p.parent.name
)
def test_the_sample_apps_manifests_are_valid(path: Path) -> None:
    manifest = parse_manifest(path.read_text(), source=str(path))
    assert json.loads(canonical_json(normalize(manifest)))["app"] == manifest.app
