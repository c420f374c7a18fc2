"""Process settings, resolved once at an entry point: defaults < file < EMBER_* env < flags.

Pure: the caller passes the environment mapping in; nothing here reads it by itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ember.core.errors import ValidationFailed


@dataclasses.dataclass(frozen=True)
class Settings:
    home: Path
    """Where the single-node stack keeps its data (``EMBER_HOME``)."""
    database_url: str | None
    """An external Postgres (``EMBER_DATABASE_URL``); None means the embedded cluster."""
    api_port: int = 7070
    """Where `ember dev up` serves the API on 127.0.0.1 (``EMBER_API_PORT``)."""
    registry_port: int = 5050
    """Where `ember dev up` serves the embedded OCI registry on 127.0.0.1
    (``EMBER_REGISTRY_PORT``; not 5000, which Debian's own docker-registry service uses)."""

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"


def load_settings(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Resolve settings from an environment mapping plus explicit overrides (flags; a
    None override means "not given")."""
    home_raw = environ.get("EMBER_HOME") or os.path.join(
        environ.get("XDG_DATA_HOME") or os.path.join(environ.get("HOME", "/root"), ".local/share"),
        "ember",
    )
    settings = Settings(
        home=Path(home_raw).expanduser(),
        database_url=environ.get("EMBER_DATABASE_URL") or None,
        api_port=_port(environ, "EMBER_API_PORT", 7070),
        registry_port=_port(environ, "EMBER_REGISTRY_PORT", 5050),
    )
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name) or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValidationFailed(
            f"{name} must be a port number, not {raw!r}",
            detail={"field": name},
        )
    return int(raw)
