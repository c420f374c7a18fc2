"""The CLI's configuration: file < ember.toml < EMBER_* < flags, and where each value came
from (ember.cli.config)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ember.cli.config import (
    DEFAULT_API_URL,
    CliConfig,
    config_path,
    load_file,
    resolve,
    resolve_explained,
    save_file,
)
from ember.core.errors import ValidationFailed


@pytest.fixture
def setup(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    config = tmp_path / "conf" / "config.toml"
    save_file(
        config,
        CliConfig(api_url="http://file:1", token="file-token", org="f-org", app="f-app"),
    )
    cwd = tmp_path / "project"
    cwd.mkdir()
    return {"HOME": str(tmp_path), "EMBER_CONFIG": str(config)}, cwd, config


def test_config_path_follows_ember_config_then_xdg_then_home() -> None:
    assert config_path({"HOME": "/h"}) == Path("/h/.config/ember/config.toml")
    assert config_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path("/x/ember/config.toml")
    assert config_path({"HOME": "/h", "EMBER_CONFIG": "/c.toml"}) == Path("/c.toml")


def test_the_file_is_private_and_round_trips(setup: tuple[dict[str, str], Path, Path]) -> None:
    _environ, _cwd, config = setup
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert load_file(config) == CliConfig("http://file:1", "file-token", "f-org", "f-app")
    assert "env" not in config.read_text()  # None is left out, not written as ""


def test_each_level_beats_the_one_below(setup: tuple[dict[str, str], Path, Path]) -> None:
    environ, cwd, config = setup
    assert resolve(environ, cwd) == CliConfig("http://file:1", "file-token", "f-org", "f-app")
    # In ember.toml, [env] is the manifest's table of variables, never the environment.
    (cwd / "ember.toml").write_text('org = "p-org"\napp = "p-app"\n[env]\nPORT = "8080"\n')
    got, sources = resolve_explained(environ, cwd)
    assert (got.org, got.app, got.env) == ("p-org", "p-app", None)
    assert "env" not in sources
    assert sources["org"] == str(cwd / "ember.toml") and sources["token"] == str(config)

    environ = {**environ, "EMBER_ORG": "e-org", "EMBER_API_TOKEN": "e-token"}
    environ["EMBER_API_URL"] = "http://env:2"
    got, sources = resolve_explained(environ, cwd)
    assert (got.api_url, got.token, got.org, got.app) == (
        "http://env:2",
        "e-token",
        "e-org",
        "p-app",
    )
    assert sources["org"] == "EMBER_ORG" and sources["token"] == "EMBER_API_TOKEN"

    got, sources = resolve_explained(environ, cwd, org="x-org", api_url="http://flag:3")
    assert (got.api_url, got.org) == ("http://flag:3", "x-org")
    assert sources == {
        "api_url": "--api-url",
        "token": "EMBER_API_TOKEN",
        "org": "--org",
        "app": str(cwd / "ember.toml"),
    }


def test_ember_toml_cannot_set_the_token_or_the_api_url(tmp_path: Path) -> None:
    """A checked-out repository must not redirect your token to another server."""
    (tmp_path / "ember.toml").write_text('token = "repo"\napi_url = "http://evil"\n')
    got, sources = resolve_explained({"EMBER_CONFIG": str(tmp_path / "none.toml")}, tmp_path)
    assert (got.token, got.api_url) == (None, DEFAULT_API_URL)
    assert sources == {"api_url": "default"}


def test_empty_values_fall_through(setup: tuple[dict[str, str], Path, Path]) -> None:
    environ, cwd, _config = setup
    got = resolve({**environ, "EMBER_ORG": "", "EMBER_API_URL": ""}, cwd, org="")
    assert (got.org, got.api_url) == ("f-org", "http://file:1")


def test_a_broken_file_is_a_validation_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text("org = \n")
    with pytest.raises(ValidationFailed) as caught:
        resolve({"EMBER_CONFIG": str(broken)}, tmp_path)
    assert caught.value.detail == {"file": str(broken)}
