"""Image references, registry URLs, auth challenges and the dev registry's config: pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.client.oci.auth import parse_challenge
from ember.client.oci.errors import InvalidReference
from ember.client.oci.reference import Reference, parse_reference, registry_url
from ember.dev.registry import RegistryConfig, render_config

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app", Reference(None, "app")),
        ("org/app:v1", Reference(None, "org/app", "v1")),
        ("127.0.0.1:5050/org/app:v1", Reference("127.0.0.1:5050", "org/app", "v1")),
        ("localhost/app", Reference("localhost", "app")),
        (f"reg.example.com/a/b/c@{DIGEST}", Reference("reg.example.com", "a/b/c", None, DIGEST)),
        (f"[::1]:5050/app:1.0@{DIGEST}", Reference("[::1]:5050", "app", "1.0", DIGEST)),
        ("my_org/app-name.x:latest", Reference(None, "my_org/app-name.x", "latest")),
    ],
)
def test_references_parse_and_print_back(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    ["", "App", "org//app", "app:", "app:-x", "app@sha256:short", "app@md5:" + "a" * 32, "a b"],
)
def test_bad_references_say_so(text: str) -> None:
    with pytest.raises(InvalidReference) as err:
        parse_reference(text)
    assert err.value.code == "oci.invalid_reference"


def test_reference_defaults_to_latest_and_pins_by_digest() -> None:
    ref = parse_reference("org/app")
    assert ref.reference == "latest"
    assert ref.by_digest(DIGEST).reference == DIGEST
    assert str(parse_reference("org/app:v2").by_digest(DIGEST)) == f"org/app@{DIGEST}"


def test_plain_http_only_for_loopback() -> None:
    assert registry_url("127.0.0.1:5050") == "http://127.0.0.1:5050"
    assert registry_url("127.1.2.3") == "http://127.1.2.3"
    assert registry_url("[::1]:5050") == "http://[::1]:5050"
    assert registry_url("localhost:5000") == "http://localhost:5000"
    assert registry_url("ghcr.io") == "https://ghcr.io"
    assert registry_url("192.168.1.10:5000") == "https://192.168.1.10:5000"
    with pytest.raises(InvalidReference):
        registry_url("https://ghcr.io")


def test_auth_challenges_parse() -> None:
    assert parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"'
    ) == (
        "bearer",
        {
            "realm": "https://auth.example/token",
            "service": "registry",
            "scope": "repository:a/b:pull,push",
        },
    )
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge("") is None


def test_dev_registry_config_is_loopback_with_its_own_storage() -> None:
    config = RegistryConfig(port=5050, root=Path("/home/x/registry"), secret="s3cret")
    doc = json.loads(render_config(config))  # JSON is YAML: what docker-registry reads
    assert doc["http"]["addr"] == "127.0.0.1:5050"
    assert doc["storage"]["filesystem"]["rootdirectory"] == "/home/x/registry/data"
    assert doc["storage"]["delete"] == {"enabled": True}
    assert "auth" not in doc
    assert config.argv == ["/usr/bin/docker-registry", "serve", "/home/x/registry/config.yml"]
    assert config.url == "http://127.0.0.1:5050"
