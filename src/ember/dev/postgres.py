"""An embedded PostgreSQL cluster from the system's binaries (initdb / pg_ctl).

Used by `ember dev up` (under ``$EMBER_HOME/postgres``) and by the test suite (an
ephemeral cluster per session). The server listens only on a Unix socket in a private
directory, so "trust" authentication is guarded by file permissions.

initdb and postgres refuse to run as root; as root we run them as the ``postgres`` system
user (created by Debian's postgresql package) and grant it traverse-only access (an ACL
``u:postgres:x``) to the directories above the data directory.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from ember.core.errors import EmberError, Kind

SUPERUSER = "ember"
DATABASE = "ember"
# Unix socket paths are limited to 107 bytes; the socket file name adds ~16.
_MAX_SOCKET_DIR = 90


class ClusterError(EmberError):
    """The embedded cluster could not be created, started or stopped."""

    code = "dev.postgres_failed"
    kind = Kind.UNAVAILABLE


def find_bindir() -> Path:
    """The newest installed PostgreSQL server binaries."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl) are not installed",
        hint="run 'make bootstrap' (installs Debian's postgresql package), "
        "or set EMBER_DATABASE_URL to use an existing server",
    )


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A cluster living in ``root`` (``root/data``, ``root/postgres.log``)."""

    root: Path
    port: int = 5432
    durable: bool = True
    """False for throwaway test clusters: no fsync, no full-page writes."""
    settings: tuple[str, ...] = ()
    """Extra ``postgresql.conf`` lines, e.g. ``"track_commit_timestamp = on"``."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        preferred = self.root / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            return preferred
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/tmp") / f"ember-pg-{digest}"  # noqa: S108 - private 0700 dir

    @property
    def run_as(self) -> str | None:
        """The unprivileged user to run as, or None to run as ourselves."""
        return "postgres" if os.geteuid() == 0 else None

    def conninfo(self, dbname: str = DATABASE) -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.initialized:
            return False
        proc = self._pg_ctl("status", check=False)
        return proc.returncode == 0

    def init(self) -> bool:
        """Create the cluster if it does not exist; return True when it was created."""
        if self.initialized:
            return False
        bindir = find_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._prepare_dir(self.root)
        self._prepare_dir(self.data_dir)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-instructions",
                *([] if self.durable else ["--no-sync"]),
            ],
            what="initdb",
        )
        conf = [
            "listen_addresses = ''",
            f"unix_socket_directories = '{self.socket_dir}'",
            f"port = {self.port}",
            "max_connections = 200",
            "shared_buffers = 128MB",
            "log_min_messages = warning",
        ]
        if not self.durable:
            conf += ["fsync = off", "full_page_writes = off", "synchronous_commit = off"]
        conf += self.settings
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write("\n# Ember embedded cluster\n" + "\n".join(conf) + "\n")
        return True

    def start(self) -> bool:
        """Start the server if it is not running; return True when it was started."""
        if not self.initialized:
            raise ClusterError(
                f"no cluster in {self.data_dir}", hint="run 'ember dev up' to create it"
            )
        if self.is_running():
            return False
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._prepare_dir(self.socket_dir)
        self.log_file.touch(exist_ok=True)
        self._prepare_dir(self.log_file)
        proc = self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file), check=False)
        if proc.returncode != 0:
            tail = self.log_file.read_text(errors="replace").splitlines()[-10:]
            raise ClusterError(
                "PostgreSQL did not start: " + (proc.stderr.strip() or proc.stdout.strip()),
                hint=f"see {self.log_file}",
                detail={"log_tail": tail},
            )
        return True

    def stop(self) -> bool:
        """Stop the server (fast shutdown); return True when it was running."""
        if not self.is_running():
            return False
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        return True

    def ensure_database(self, name: str = DATABASE, template: str | None = None) -> bool:
        """Create ``name`` unless it exists; return True when created."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone():
                return False
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(query)
        return True

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.socket_dir != self.root / "run":
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(find_bindir() / "pg_ctl"), "-D", str(self.data_dir), *args]
        return self._run(cmd, what="pg_ctl " + args[0], check=check)

    def _run(
        self, cmd: list[str], *, what: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        # Start from / so the unprivileged user is never left in a directory it cannot read.
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/", check=False)
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{what} failed (exit {proc.returncode}): "
                + (proc.stderr.strip() or proc.stdout.strip()),
                hint=f"see {self.log_file}" if self.log_file.exists() else None,
            )
        return proc

    def _prepare_dir(self, path: Path) -> None:
        """Hand ``path`` to the unprivileged user and let it traverse the parents."""
        if not self.run_as:
            return
        try:
            pw = pwd.getpwnam(self.run_as)
        except KeyError:
            raise ClusterError(
                f"there is no '{self.run_as}' user to run PostgreSQL as (it refuses root)",
                hint="install Debian's postgresql package (make bootstrap does), which creates it",
            ) from None
        os.chown(path, pw.pw_uid, pw.pw_gid)
        for parent in path.resolve().parents:
            st = parent.stat()
            if st.st_mode & 0o001 or st.st_uid == pw.pw_uid:
                continue
            setfacl = shutil.which("setfacl")
            if setfacl is None:
                raise ClusterError(
                    f"{self.run_as} cannot reach {path}: {parent} is not searchable",
                    hint="install the 'acl' package (make bootstrap does) or set EMBER_HOME "
                    "to a directory outside /root",
                )
            self._run_root([setfacl, "-m", f"u:{self.run_as}:x", str(parent)])

    @staticmethod
    def _run_root(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
