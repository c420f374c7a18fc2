"""The real `ember manifest validate|show|schema` executable on real files
(docs/specs/manifest.md, "Commands"): exit codes, error lines on stderr, --json.

These commands work offline: every run here points the CLI at an API address where
nothing listens and at an empty config (no token), so any attempt to reach the control
plane would fail the test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ember.core.manifest import (
    ManifestInvalid,
    for_environment,
    manifest_hash,
    normalize,
    parse_manifest,
    render_json_schema,
)
from tests.e2e.conftest import EMBER, clean_env, concurrently

VALID = """\
schema_version = 1
app = "hello"

[processes]
web = "httpd -f -p 8080 -h /www"

[[services]]
internal_port = 8080

  [[services.checks]]
  type = "http"
  path = "/healthz"

[environments.staging]
deploy.strategy = "immediate"
env.LOG_LEVEL = "debug"
"""

INVALID = """\
schema_version = 1
app = "hello"

[[services]]
process = "wbe"
internal_port = 70000

  [[services.checks]]
  intervall = "10s"

[deploy]
strategy = "bluegreen"

[[mounts]]
volume = "data"
path = "data"
"""


def ember(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [EMBER, *args],
        cwd=cwd,
        env=clean_env(
            EMBER_API_URL="http://127.0.0.1:9",  # nothing listens: offline or fail
            EMBER_CONFIG=str(cwd / "no-config.toml"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "ember.toml").write_text(VALID)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ember.toml").write_text(INVALID)
    (tmp_path / "syntax.toml").write_text('schema_version = 1\napp = "hello\n')
    return tmp_path


def test_validate_a_valid_manifest(app_dir: Path) -> None:
    digest = manifest_hash(parse_manifest(VALID))
    plain, as_json, explicit = concurrently(
        lambda: ember(app_dir, "manifest", "validate"),
        lambda: ember(app_dir, "manifest", "validate", "--json"),
        lambda: ember(app_dir / "broken", "manifest", "validate", "../ember.toml"),
    )
    assert (plain.returncode, plain.stdout, plain.stderr) == (
        0,
        f"ember.toml is valid ({digest})\n",
        "",
    )
    assert as_json.returncode == 0, as_json.stderr
    staging = manifest_hash(for_environment(parse_manifest(VALID), "staging"))
    assert json.loads(as_json.stdout) == {
        "file": "ember.toml",
        "valid": True,
        "app": "hello",
        "manifest_hash": digest,
        "environments": {"staging": staging},
    }
    assert explicit.returncode == 0 and explicit.stdout == f"../ember.toml is valid ({digest})\n"


def test_validate_an_invalid_manifest_lists_every_error(app_dir: Path) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(INVALID, source="broken/ember.toml")
    expected = [str(e) for e in info.value.errors]
    assert 'services[0].checks[0].intervall: unknown field (did you mean "interval"?)' in expected
    assert len(expected) == 5

    plain, as_json, syntax = concurrently(
        lambda: ember(app_dir, "manifest", "validate", "broken/ember.toml"),
        lambda: ember(app_dir, "manifest", "validate", "broken/ember.toml", "--json"),
        lambda: ember(app_dir, "manifest", "validate", "syntax.toml"),
    )
    assert plain.returncode == 2 and plain.stdout == ""
    lines = plain.stderr.splitlines()
    assert lines[0] == "Error: broken/ember.toml is not a valid manifest (5 errors):"
    assert lines[1:6] == expected  # one per line, path first
    assert lines[6].startswith("Hint: ")

    assert as_json.returncode == 2 and as_json.stdout == ""
    envelope = json.loads(as_json.stderr)
    assert envelope["exit_code"] == 2
    assert envelope["error"]["code"] == "manifest.invalid"
    assert envelope["error"]["detail"] == info.value.detail

    assert syntax.returncode == 2
    assert syntax.stderr.splitlines()[:2] == [
        "Error: syntax.toml is not a valid manifest (1 error):",
        "line 2, column 13: illegal character '\\n'",
    ]


def test_a_missing_or_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    missing, named, as_json, directory = concurrently(
        lambda: ember(tmp_path, "manifest", "validate"),
        lambda: ember(tmp_path, "manifest", "show", "nope.toml"),
        lambda: ember(tmp_path, "manifest", "validate", "--json"),
        lambda: ember(tmp_path, "manifest", "validate", "."),
    )
    assert missing.returncode == 2 and missing.stderr.startswith("Error: ember.toml not found\n")
    assert named.returncode == 2 and "nope.toml not found" in named.stderr
    error = json.loads(as_json.stderr)["error"]
    assert error["code"] == "manifest.file_missing" and error["detail"] == {"file": "ember.toml"}
    assert directory.returncode == 2 and "cannot read ." in directory.stderr


def test_show(app_dir: Path) -> None:
    manifest = parse_manifest(VALID)
    normalized, plain, staging, human, bad_env, other_env = concurrently(
        lambda: ember(app_dir, "manifest", "show", "--normalized", "--json"),
        lambda: ember(app_dir, "manifest", "show", "--json", "ember.toml"),
        lambda: ember(app_dir, "manifest", "show", "--normalized", "--json", "--env", "staging"),
        lambda: ember(app_dir, "manifest", "show"),
        lambda: ember(app_dir, "manifest", "show", "--env", "Prod"),
        lambda: ember(app_dir, "manifest", "show", "--normalized", "--json", "--env", "prod"),
    )
    assert normalized.returncode == 0, normalized.stderr
    body = json.loads(normalized.stdout)
    assert body.pop("manifest_hash") == manifest_hash(manifest)
    assert body == normalize(manifest)
    assert body["services"][0]["checks"][0]["interval"] == "10s"  # defaults filled

    as_written = json.loads(plain.stdout)
    assert as_written["manifest_hash"] == manifest_hash(manifest)
    assert as_written["environments"]["staging"]["deploy"]["strategy"] == "immediate"

    env_body = json.loads(staging.stdout)
    assert env_body["deploy"]["strategy"] == "immediate"
    assert env_body["env"] == {"LOG_LEVEL": "debug"}
    assert env_body["environments"] == {}
    assert env_body["manifest_hash"] == manifest_hash(for_environment(manifest, "staging"))

    assert human.returncode == 0 and json.loads(human.stdout)["app"] == "hello"
    assert bad_env.returncode == 2 and "invalid environment name 'Prod'" in bad_env.stderr
    assert other_env.returncode == 0
    assert "has no [environments.prod]; showing the base manifest" in other_env.stderr
    assert json.loads(other_env.stdout)["deploy"]["strategy"] == "rolling"


def test_schema_prints_the_committed_json_schema(tmp_path: Path) -> None:
    proc = ember(tmp_path, "manifest", "schema")
    assert proc.returncode == 0 and proc.stdout == render_json_schema()
