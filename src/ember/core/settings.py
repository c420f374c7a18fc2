"""Process settings, resolved once at an entry point: defaults < file < EMBER_* env < flags.

Pure: the caller passes the environment mapping in; nothing here reads it by itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from ember.core.errors import ValidationFailed


@dataclasses.dataclass(frozen=True)
class Settings:
    home: Path
    """Where the single-node stack keeps its data (``EMBER_HOME``)."""
    database_url: str | None
    """An external Postgres (``EMBER_DATABASE_URL``); None means the embedded cluster."""
    api_port: int = 7070
    """Where `ember dev up` serves the API on 127.0.0.1 (``EMBER_API_PORT``)."""

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"


def load_settings(environ: Mapping[str, str], **overrides: object) -> Settings:
    """Resolve settings from an environment mapping plus explicit overrides (flags)."""
    home_raw = environ.get("EMBER_HOME") or os.path.join(
        environ.get("XDG_DATA_HOME") or os.path.join(environ.get("HOME", "/root"), ".local/share"),
        "ember",
    )
    port_raw = environ.get("EMBER_API_PORT") or "7070"
    if not port_raw.isdigit() or not 1 <= int(port_raw) <= 65535:
        raise ValidationFailed(
            f"EMBER_API_PORT must be a port number, not {port_raw!r}",
            detail={"field": "EMBER_API_PORT"},
        )
    values: dict[str, object] = {
        "home": Path(home_raw).expanduser(),
        "database_url": environ.get("EMBER_DATABASE_URL") or None,
        "api_port": int(port_raw),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]
