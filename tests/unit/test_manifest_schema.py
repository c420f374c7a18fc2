"""docs/specs/manifest.schema.json is generated from the manifest model; it must not drift."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from ember.core.manifest import json_schema, render_json_schema

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs/specs/manifest.schema.json"
GOLDEN = Path(__file__).parent / "golden" / "manifest"


def test_committed_manifest_schema_matches_the_model() -> None:
    assert COMMITTED.read_text() == render_json_schema(), (
        "docs/specs/manifest.schema.json is stale: run 'make manifest-schema' and commit it"
    )


def test_the_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("valid_*.toml")), ids=lambda p: p.stem)
def test_valid_manifests_satisfy_the_schema(path: Path) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(COMMITTED.read_text()))
    document = tomllib.loads(path.read_text())
    assert validator.is_valid(document), [e.message for e in validator.iter_errors(document)]
