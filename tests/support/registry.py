"""A real registry for tests: Debian's docker-registry on a free loopback port with its own
storage directory, started through ember.dev.registry (the code `ember dev up` uses)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember.dev import registry
from ember.dev.processes import Supervisor
from tests.support.net import free_port


@dataclasses.dataclass(frozen=True)
class RunningRegistry:
    url: str
    host: str
    """``127.0.0.1:PORT``: what RegistryClient takes."""
    storage: Path
    log: Path

    def blob_file(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's (or manifest's) bytes."""
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def bcrypt(password: str) -> str:
    """A bcrypt hash for an htpasswd file, from the system's libcrypt (libxcrypt)."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    hashed = lib.crypt(password.encode(), b"$2b$05$abcdefghijklmnopqrstuu")
    assert hashed and hashed.startswith(b"$2b$"), hashed
    return hashed.decode()


@contextmanager
def running_registry(users: dict[str, str] | None = None) -> Iterator[RunningRegistry]:
    """A registry on a free port; with ``users`` (name -> password) it requires HTTP
    Basic authentication (distribution's htpasswd backend)."""
    if not Path(registry.BINARY).exists():
        pytest.fail(f"{registry.BINARY} is missing: run 'make bootstrap'")
    home = Path(tempfile.mkdtemp(prefix="ember-registry-"))
    config = registry.prepare(home / "registry", free_port())
    if users:
        htpasswd = home / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{bcrypt(p)}\n" for u, p in users.items()))
        doc = json.loads(registry.render_config(config))
        doc["auth"] = {"htpasswd": {"realm": "ember-tests", "path": str(htpasswd)}}
        config.config_file.write_text(json.dumps(doc))
    sup = Supervisor(home, markers={registry.NAME: config.marker})
    registry.start(sup, config, {"PATH": "/usr/bin:/bin"})
    try:
        registry.wait_ready(
            config.url,
            timeout=30,
            exited=lambda: sup.exited_early(registry.NAME),
            log=sup.log_file(registry.NAME),
            statuses=(401,) if users else (200,),
        )
        yield RunningRegistry(
            config.url,
            f"127.0.0.1:{config.port}",
            config.storage_dir,
            sup.log_file(registry.NAME),
        )
    finally:
        sup.stop(registry.NAME, grace_s=5)
        shutil.rmtree(home, ignore_errors=True)
