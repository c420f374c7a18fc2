"""The embedded OCI registry of the single-node stack: Debian's ``docker-registry``
(CNCF distribution 2.8) on loopback, storing under ``$EMBER_HOME/registry``.

Ours never touches the Debian package's own service: that one (if its init script ever
starts) reads ``/etc/docker/registry/config.yml``, listens on :5000 and stores in
``/var/lib/docker-registry``; ours gets its own config file, port (``EMBER_REGISTRY_PORT``,
default 5050), storage directory and an environment without ``REGISTRY_*`` overrides.
Nothing here needs that service to run, or to be stopped.

Layout under ``$EMBER_HOME/registry``: ``config.yml`` (rendered on every start),
``secret`` (the upload-state HMAC key, kept across restarts so an interrupted upload can
resume), ``data/`` (the storage driver's root). No authentication: it listens on
127.0.0.1 only; deletes are enabled so releases' garbage collection can work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from ember.core.errors import Unavailable
from ember.dev.processes import Supervisor

NAME = "registry"
BINARY = "/usr/bin/docker-registry"
DEFAULT_PORT = 5050


class RegistryFailed(Unavailable):
    code = "dev.registry_failed"


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    port: int
    root: Path
    """``$EMBER_HOME/registry`` (or a test's directory)."""
    secret: str
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yml"

    @property
    def storage_dir(self) -> Path:
        return self.root / "data"

    @property
    def argv(self) -> list[str]:
        return [BINARY, "serve", str(self.config_file)]

    @property
    def marker(self) -> tuple[bytes, ...]:
        """What /proc/PID/cmdline of this registry holds (the Supervisor's pid-reuse
        guard): the binary and our own config file, so no other registry matches."""
        return marker(self.root)


def marker(root: Path) -> tuple[bytes, ...]:
    return (b"docker-registry", b"serve", os.fsencode(root / "config.yml"))


def render_config(config: RegistryConfig) -> str:
    """The registry's config.yml (JSON is YAML, so no YAML library is needed). Pure."""
    doc = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(config.storage_dir)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {
                "uploadpurging": {
                    "enabled": True,
                    "age": "168h",
                    "interval": "24h",
                    "dryrun": False,
                }
            },
        },
        "http": {
            "addr": f"{config.host}:{config.port}",
            "secret": config.secret,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def prepare(root: Path, port: int = DEFAULT_PORT) -> RegistryConfig:
    """Create the directories, the secret (once) and config.yml under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    secret_file = root / "secret"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    config = RegistryConfig(port=port, root=root, secret=secret_file.read_text().strip())
    config.storage_dir.mkdir(exist_ok=True)
    tmp = config.config_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secret
    with os.fdopen(fd, "w") as f:
        f.write(render_config(config))
    os.replace(tmp, config.config_file)
    return config


def clean_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without REGISTRY_* variables (they would override our config.yml)."""
    return {k: v for k, v in environ.items() if not k.startswith("REGISTRY_")}


def start(sup: Supervisor, config: RegistryConfig, environ: Mapping[str, str]) -> bool:
    """Start the registry under ``sup`` unless it runs; True when started now."""
    if not os.access(BINARY, os.X_OK):
        raise RegistryFailed(
            f"{BINARY} is missing",
            hint="install it: 'make bootstrap' (or apt-get install docker-registry)",
        )
    return sup.start(NAME, config.argv, clean_env(environ))


def is_ready(url: str, statuses: tuple[int, ...] = (200,)) -> bool:
    """Does ``GET /v2/`` answer one of ``statuses``? (401 means ready, for a registry
    that requires authentication.)"""
    try:
        return httpx.get(f"{url}/v2/", timeout=2).status_code in statuses
    except httpx.HTTPError:
        return False


def wait_ready(
    url: str,
    *,
    timeout: float = 30.0,
    exited: Callable[[], bool] = lambda: False,
    log: Path | None = None,
    statuses: tuple[int, ...] = (200,),
) -> None:
    """Return once ``GET /v2/`` answers 200; RegistryFailed if ``exited()`` or time out."""
    deadline = time.monotonic() + timeout
    where = f"see {log}" if log else None
    while time.monotonic() < deadline:
        if is_ready(url, statuses):
            return
        if exited():
            raise RegistryFailed("the registry exited during start-up", hint=where)
        time.sleep(0.1)
    raise RegistryFailed(f"the registry at {url} did not become ready in time", hint=where)
