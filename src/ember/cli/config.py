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
    config, _sources = resolve_explained(environ, cwd, api_url=api_url, org=org, app=app, env=env)
    return config


def resolve_explained(
    environ: Mapping[str, str],
    cwd: Path,
    *,
    api_url: str | None = None,
    org: str | None = None,
    app: str | None = None,
    env: str | None = None,
) -> tuple[CliConfig, dict[str, str]]:
    """Like :func:`resolve`, plus where each value that is set came from, as a person
    would change it: ``{"org": "--org", "app": "EMBER_APP", "env": "/src/ember.toml",
    "token": "/home/ada/.config/ember/config.toml", "api_url": "default"}``."""
    path = config_path(environ)
    stored = _read_toml(path)
    project_file = cwd / "ember.toml"
    project = _read_toml(project_file)
    sources: dict[str, str] = {}

    def pick(key: str, flag: str | None, var: str, *, in_project: bool = True) -> str | None:
        def text(raw: Mapping[str, Any]) -> str | None:
            value = raw.get(key)
            return value if isinstance(value, str) else None

        candidates = [
            (flag, "--" + key.replace("_", "-")),
            (environ.get(var), var),
            (text(project) if in_project else None, str(project_file)),
            (text(stored), str(path)),
        ]
        for value, source in candidates:
            if value:
                sources[key] = source
                return value
        return None

    url = pick("api_url", api_url, "EMBER_API_URL", in_project=False)
    if url is None:
        url, sources["api_url"] = DEFAULT_API_URL, "default"
    config = CliConfig(
        api_url=url,
        token=pick("token", None, "EMBER_API_TOKEN", in_project=False),
        org=pick("org", org, "EMBER_ORG"),
        app=pick("app", app, "EMBER_APP"),
        # In ember.toml, [env] is the table of plain variables (docs/specs/manifest.md),
        # never the target environment: that comes from --env, EMBER_ENV or the config.
        env=pick("env", env, "EMBER_ENV", in_project=False),
    )
    return config, sources
