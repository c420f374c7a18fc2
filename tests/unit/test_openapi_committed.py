from __future__ import annotations

from pathlib import Path

from ember.api.openapi import render

COMMITTED = Path(__file__).resolve().parents[2] / "docs/specs/openapi.json"


def test_committed_openapi_matches_the_api() -> None:
    assert COMMITTED.read_text() == render(), (
        "docs/specs/openapi.json is stale: run 'make openapi' and commit it"
    )


def test_every_v1_route_documents_the_error_envelope() -> None:
    import json

    spec = json.loads(COMMITTED.read_text())
    public = {"/v1/platform"}  # answers without a token
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/") or path in public:
            continue
        for method, op in ops.items():
            assert {"401", "404", "422"} <= set(op["responses"]), (method, path)
