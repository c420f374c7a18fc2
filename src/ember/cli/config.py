"""The CLI's config file (``~/.config/ember/config.toml``) and context resolution.

Precedence for every value: flags > ``EMBER_*`` environment > ``ember.toml`` in the
working directory (org/app/env only) > the config file > defaults.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ember.core.errors import ValidationFailed

DEFAULT_API_URL = "http://127.0.0.1:7070"


@dataclasses.dataclass(frozen=True)
class CliConfig:
    api_url: str = DEFAULT_API_URL
    token: str | None = None
    org: str | None = None
    app: str | None = None
    env: str | None = None

    def to_toml(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("EMBER_CONFIG"):
        return Path(environ["EMBER_CONFIG"]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME", "/root"), ".config")
    return Path(base) / "ember" / "config.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ValidationFailed(
            f"{path} is not valid TOML: {exc}",
            hint="fix or delete the file",
            detail={"file": str(path)},
        ) from exc


def load_file(path: Path) -> CliConfig:
    raw = _read_toml(path)
    known = {f.name for f in dataclasses.fields(CliConfig)}
    return CliConfig(**{k: str(v) for k, v in raw.items() if k in known})


def save_file(path: Path, config: CliConfig) -> None:
    """Write the config with mode 0600: it holds a token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        tomli_w.dump(config.to_toml(), fh)
    os.replace(tmp, path)


def resolve(
    environ: Mapping[str, str],
    cwd: Path,
    *,
    api_url: str | None = None,
    org: str | None = None,
    app: str | None = None,
    env: str | None = None,
) -> CliConfig:
    """The effective configuration of one invocation."""
    stored = load_file(config_path(environ))
    project = _read_toml(cwd / "ember.toml")

    def pick(flag: str | None, var: str, key: str, fallback: str | None) -> str | None:
        project_value = project.get(key)
        return (
            flag
            or environ.get(var)
            or (str(project_value) if project_value is not None else None)
            or fallback
        )

    return CliConfig(
        api_url=api_url or environ.get("EMBER_API_URL") or stored.api_url,
        token=environ.get("EMBER_API_TOKEN") or stored.token,
        org=pick(org, "EMBER_ORG", "org", stored.org),
        app=pick(app, "EMBER_APP", "app", stored.app),
        env=pick(env, "EMBER_ENV", "env", stored.env),
    )
