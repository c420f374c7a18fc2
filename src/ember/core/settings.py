"""Process settings, resolved once at an entry point: defaults < file < EMBER_* env < flags.

Pure: the caller passes the environment mapping in; nothing here reads it by itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Settings:
    home: Path
    """Where the single-node stack keeps its data (``EMBER_HOME``)."""
    database_url: str | None
    """An external Postgres (``EMBER_DATABASE_URL``); None means the embedded cluster."""

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"


def load_settings(environ: Mapping[str, str], **overrides: object) -> Settings:
    """Resolve settings from an environment mapping plus explicit overrides (flags)."""
    home_raw = environ.get("EMBER_HOME") or os.path.join(
        environ.get("XDG_DATA_HOME") or os.path.join(environ.get("HOME", "/root"), ".local/share"),
        "ember",
    )
    values: dict[str, object] = {
        "home": Path(home_raw).expanduser(),
        "database_url": environ.get("EMBER_DATABASE_URL") or None,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]
