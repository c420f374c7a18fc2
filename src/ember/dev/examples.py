"""Build the sample apps under ``examples/`` into OCI image layouts, without Docker.

    python -m ember.dev.examples build hello-http --out DIR [--cache DIR] [--json]
    python -m ember.dev.examples list

Each image has two layers, both built by ember.client.oci.builder (deterministic):

1. *packages*: the root filesystem assembled from Debian packages. The example names a
   few packages; their dependency closure comes from ``apt-cache depends --recurse``
   (hard dependencies only); the ``.deb`` files are fetched with ``apt-get download`` at
   the candidate version into ``CACHE/debs`` (default ``$EMBER_HOME/cache/debs``), checked
   against the SHA256 of apt's package index, reused from there on later builds, and
   unpacked with ``dpkg -x`` (no maintainer scripts run, nothing is installed on this
   machine). Documentation, man pages and locales are left out; busybox's applets get
   symlinks (``/bin/sh``, ``/usr/sbin/httpd``, ...) where no package put a file.
   Nothing but the Debian mirror is contacted, and with a warm cache not even that.
2. *app*: ``examples/NAME/rootfs/`` (modes normalised: 0755 for directories and
   executables, 0644 otherwise), the example's C programs compiled with this machine's
   gcc (static and stripped: ``CFLAGS``), a minimal ``/etc/passwd`` and ``/etc/group``,
   ``/tmp`` and, for hello-tls, a self-signed certificate made with the ``openssl``
   command the first time and kept in ``CACHE/examples/hello-tls`` so that rebuilding
   with the same cache gives the same digest.

Same cache in, same digest out: two builds of an example with one cache directory (and
one toolchain: gcc, libc6-dev, libssl-dev) give byte-identical layouts. A stripped static
binary holds no paths, timestamps or debug info; the layer builder zeroes mtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from ember.client.oci import ImageConfig, LayoutInvalid, OciLayout, build_image
from ember.core.errors import EmberError, Unavailable, ValidationFailed
from ember.core.settings import load_settings

EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"
NOBODY = "65534:65534"
# Never part of an app's root filesystem (documentation, translations, packaging hooks).
PRUNE = (
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/doc-base",
    "usr/share/initramfs-tools",
)


# Static (no shared libraries needed in the image) and stripped (no paths or debug info,
# so the same source and toolchain give the same bytes); hardened, as they face the network.
CFLAGS = (
    "-static",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-s",
    "-D_FORTIFY_SOURCE=2",
    "-fstack-protector-strong",
)


class ExampleFailed(Unavailable):
    code = "dev.example_failed"


@dataclasses.dataclass(frozen=True)
class Program:
    """A C program of an example, compiled into its app layer."""

    source: str
    """Relative to the example's directory."""
    target: str
    """Its path in the image."""
    libs: tuple[str, ...] = ()
    """Linked statically (``-lNAME``)."""


@dataclasses.dataclass(frozen=True)
class Example:
    name: str
    packages: tuple[str, ...]
    """The Debian packages the app needs; their dependencies are added automatically."""
    config: ImageConfig
    tls: bool = False
    """Generate a self-signed certificate into /etc/hello-tls/{cert,key}.pem."""
    programs: tuple[Program, ...] = ()


EXAMPLES: dict[str, Example] = {
    "hello-http": Example(
        "hello-http",
        ("busybox-static",),
        ImageConfig(
            cmd=["httpd", "-f", "-v", "-p", "8080", "-h", "/www"],
            working_dir="/www",
            user=NOBODY,
            exposed_ports=["8080/tcp"],
            labels={"org.opencontainers.image.title": "hello-http"},
        ),
    ),
    "hello-tls": Example(
        "hello-tls",
        # The server is a static binary; busybox is the shell for `ember exec` and
        # poking around.
        ("busybox-static",),
        ImageConfig(
            cmd=["/usr/local/bin/hello-tls"],
            user=NOBODY,
            exposed_ports=["8443/tcp"],
            labels={"org.opencontainers.image.title": "hello-tls"},
        ),
        tls=True,
        # TLS with OpenSSL, behind an optional PROXY v2 header (examples/hello-tls/README.md).
        programs=(Program("hello-tls.c", "/usr/local/bin/hello-tls", ("ssl", "crypto")),),
    ),
}


# -- Debian packages ----------------------------------------------------------------------


# The hello-http image with a command that tells instances and releases apart: each
# instance serves its hostname at /who and the release's VERSION at /version (its health
# check) besides the page. Under /tmp: the server runs as nobody, who cannot write the
# image's /www. For the end-to-end tests and `make bench-deploy` (rolling deploys that
# must show which release and which instance answered).
_VERSIONED_SCRIPT = " && ".join(
    (
        "mkdir -p /tmp/www",
        "cp /www/index.html /tmp/www/",
        "hostname > /tmp/www/who",
        "echo v$VERSION > /tmp/www/version",
        "exec httpd -f -v -p 8080 -h /tmp/www",
    )
)
_VERSIONED_MANIFEST = """\
schema_version = 1
app = "{app}"

[processes]
web = ["/bin/sh", "-c", {script}]

[env]
VERSION = "{version}"

[[services]]
process = "web"
internal_port = 8080
protocol = "tcp"

  [[services.checks]]
  type = "http"
  path = "/version"
  interval = "1s"
  timeout = "1s"
  grace_period = "1s"

[[vm]]
processes = ["web"]
cpus = 1
memory_mb = 128

[deploy]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
"""


def versioned_hello_http_manifest(app: str, version: int) -> str:
    """An ember.toml for the hello-http image whose instances serve ``/who`` (their
    hostname) and ``/version`` (``v<version>``)."""
    return _VERSIONED_MANIFEST.format(
        app=app, version=version, script=json.dumps(_VERSIONED_SCRIPT)
    )


def _run(
    argv: Sequence[str], *, cwd: Path | None = None, what: str, hint: str | None = None
) -> str:
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError as exc:
        raise ExampleFailed(
            f"{argv[0]} is not installed (needed to {what})",
            hint=hint or "build examples on Debian with apt, dpkg and openssl ('make bootstrap')",
        ) from exc
    if proc.returncode != 0:
        raise ExampleFailed(
            f"could not {what}: {argv[0]} exited {proc.returncode}: {proc.stderr.strip()[-500:]}",
            hint=hint
            or "run 'apt-get update' once if apt knows no packages; check the Debian mirror",
        )
    return proc.stdout


def dependency_closure(packages: Sequence[str]) -> list[str]:
    """``packages`` plus everything they hard-depend on (Depends, Pre-Depends), sorted."""
    out = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *packages,
        ],
        what=f"resolve the dependencies of {', '.join(packages)}",
    )
    # Unindented lines are packages; "<name>" is a virtual package something provides.
    names = {line.strip() for line in out.splitlines() if line and not line[0].isspace()}
    return sorted(n for n in names if not n.startswith("<"))


@dataclasses.dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    sha256: str

    @property
    def filename(self) -> str:
        """What ``apt-get download`` names the file (an epoch's ':' becomes %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def candidates(packages: Sequence[str]) -> list[DebPackage]:
    """The candidate version apt would install of each package, with its index SHA256."""
    out = _run(
        ["apt-cache", "show", "--no-all-versions", *packages],
        what="look the packages up in apt's index",
    )
    found: dict[str, DebPackage] = {}
    for stanza in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line[0].isspace():
                fields[key] = value.strip()
        if "Package" in fields and fields["Package"] not in found:
            found[fields["Package"]] = DebPackage(
                fields["Package"],
                fields["Version"],
                fields.get("Architecture", "all"),
                fields.get("SHA256", ""),
            )
    missing = sorted(set(packages) - set(found))
    if missing:
        raise ExampleFailed(f"apt knows no package named {', '.join(missing)}")
    return [found[p] for p in packages]


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def fetch_debs(packages: Sequence[DebPackage], cache: Path) -> list[Path]:
    """The .deb files of ``packages`` in ``cache``, downloading only the missing ones."""
    cache.mkdir(parents=True, exist_ok=True)

    def good(pkg: DebPackage) -> bool:
        path = cache / pkg.filename
        return path.exists() and (not pkg.sha256 or _sha256_file(path) == pkg.sha256)

    missing = [p for p in packages if not good(p)]
    if missing:
        _run(
            [
                "apt-get",
                "download",
                "-q",
                # apt drops to the _apt user to download; a cache it cannot write to (under
                # root's home) would make it warn, so stay who we are.
                "-o",
                "APT::Sandbox::User=root" if os.getuid() == 0 else "APT::Sandbox::User=",
                *[f"{p.name}={p.version}" for p in missing],
            ],
            cwd=cache,
            what=f"download {', '.join(p.name for p in missing)}",
        )
        bad = [p.name for p in missing if not good(p)]
        if bad:
            raise ExampleFailed(f"downloaded packages do not match apt's index: {bad}")
    return [cache / p.filename for p in packages]


def unpack(debs: Sequence[Path], root: Path) -> None:
    """``dpkg -x`` every package into ``root``, then drop documentation and the like."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"unpack {deb.name}")
    for rel in PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    doc = root / "usr/share/doc"
    if doc.is_dir():  # keep the licences, drop the rest
        for path in sorted(doc.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.name != "copyright":
                path.unlink()


def link_busybox(root: Path) -> None:
    """Symlink busybox's applets where no package installed the command itself."""
    busybox = root / "bin/busybox"
    if not busybox.exists():
        return
    applets = _run([str(busybox), "--list-full"], what="list busybox's applets")
    for rel in sorted(applets.split()):
        if "/" not in rel:
            continue  # "linuxrc": an initrd's entry point, not a command
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


# -- the app layer --------------------------------------------------------------------------


def _normalise_modes(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - an image's directories are world-readable
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & stat.S_IXUSR
            os.chmod(path, 0o755 if executable else 0o644)


def tls_material(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``name`` in ``directory``, made once."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name},DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        what="make a self-signed certificate",
    )
    return cert, key


def compile_program(program: Program, source: Path, root: Path) -> None:
    """``gcc`` ``program`` from the example directory ``source`` into ``root``."""
    target = root / program.target.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "gcc",
            *CFLAGS,
            "-o",
            str(target),
            str(source / program.source),
            *(f"-l{lib}" for lib in program.libs),
        ],
        what=f"compile {program.source}",
        hint="install gcc, libc6-dev and the -dev packages of the libraries ('make bootstrap')",
    )


def stage_app(example: Example, source: Path, root: Path, cache: Path) -> None:
    overlay = source / "rootfs"
    if overlay.is_dir():
        shutil.copytree(overlay, root, symlinks=True, dirs_exist_ok=True)
    else:
        root.mkdir(parents=True, exist_ok=True)
    for program in example.programs:
        compile_program(program, source, root)
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    if example.tls:
        cert, key = tls_material(cache / "examples" / example.name, example.name)
        target = etc / example.name
        target.mkdir(exist_ok=True)
        shutil.copyfile(cert, target / "cert.pem")
        # Readable by the unprivileged user the server runs as. A sample's key: real apps
        # get theirs from secrets, never from the image.
        shutil.copyfile(key, target / "key.pem")
    _normalise_modes(root)
    (root / "tmp").mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)  # noqa: S103 - /tmp is sticky and world-writable


# -- the build ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    name: str
    layout: Path
    digest: str
    packages: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "layout": str(self.layout),
            "digest": self.digest,
            "packages": list(self.packages),
        }


def build(
    name: str,
    out: Path,
    *,
    cache: Path,
    source: Path | None = None,
    ref_name: str = "latest",
) -> Built:
    """Build example ``name`` into the OCI layout ``out`` (created or added to)."""
    if name not in EXAMPLES:
        raise ValidationFailed(
            f"no example named {name!r}",
            hint=f"examples: {', '.join(sorted(EXAMPLES))}",
            detail={"field": "name"},
        )
    example = EXAMPLES[name]
    source = source or EXAMPLES_DIR / name
    packages = candidates(dependency_closure(example.packages))
    debs = fetch_debs(packages, cache / "debs")
    with tempfile.TemporaryDirectory(prefix=f"ember-{name}-") as tmp:
        system, app = Path(tmp) / "packages", Path(tmp) / "app"
        unpack(debs, system)
        link_busybox(system)
        stage_app(example, source, app, cache)
        desc = build_image(OciLayout.create(out), [system, app], example.config, ref_name=ref_name)
    return Built(name, out, desc.digest, tuple(f"{p.name}={p.version}" for p in packages))


def unpack_image(layout: Path, dest: Path, ref_name: str | None = None) -> dict[str, object]:
    """Apply the image's layers in order into ``dest`` (OCI whiteouts honoured); return
    its image config. For trying the samples (``chroot``) only: it trusts the image as a
    build of its own (absolute symlinks, setuid bits and all), unlike the agent's unpacker,
    which never writes outside the root filesystem it builds."""
    import tarfile

    from ember.client.oci.media import Descriptor

    image = OciLayout.open(layout)
    desc = image.resolve(ref_name)
    manifest = image.manifest(desc)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in manifest["layers"]:
        layer = Descriptor.from_json(entry)
        for _ in image.iter_blob(layer):  # verify before trusting a byte of it
            pass
        with image.open_blob(layer) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name = Path(member.name)
                if name.name == ".wh..wh..opq":
                    for child in _inside(dest, name.parent).glob("*"):
                        _remove(child)
                    continue
                if name.name.startswith(".wh."):
                    _remove(_inside(dest, name.parent / name.name[4:]))
                    continue
                # "tar": no absolute or ../ names, no links out of dest, no device files.
                tar.extract(member, dest, filter="tar")
    return image.image_config(desc)


def _inside(dest: Path, relative: Path) -> Path:
    """``dest / relative``, refusing anything that would reach outside ``dest`` (``..``,
    absolute names, or a parent directory that is a symlink)."""
    root = dest.resolve()
    target = root / relative
    if relative.is_absolute() or ".." in relative.parts:
        raise LayoutInvalid(f"layer entry {relative} points outside the image")
    parent = target.parent
    if parent.resolve() != parent or not str(parent).startswith(str(root)):
        raise LayoutInvalid(f"layer entry {relative} points outside the image")
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@click.group()
def main() -> None:
    """Build Ember's sample apps into OCI image layouts (no Docker needed)."""


@main.command("build")
@click.argument("name", type=click.Choice(sorted(EXAMPLES)))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="layout dir")
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=None,
    help="cache for .debs and generated keys [default: $EMBER_HOME/cache]",
)
@click.option("--source", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--ref-name", default="latest", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def build_command(
    name: str, out: Path, cache: Path | None, source: Path | None, ref_name: str, as_json: bool
) -> None:
    """Build example NAME into the OCI layout directory OUT."""
    cache = cache or load_settings(os.environ).home / "cache"
    try:
        built = build(name, out, cache=cache, source=source, ref_name=ref_name)
    except EmberError as exc:
        hint = f"\nHint: {exc.hint}" if exc.hint else ""
        raise click.ClickException(exc.message + hint) from exc
    if as_json:
        click.echo(json.dumps(built.to_json(), sort_keys=True))
    else:
        click.echo(f"Built {name} into {out} ({ref_name}): {built.digest}")


@main.command("unpack")
@click.argument("layout", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--ref-name", default=None, help="which image of the layout [default: the only]")
def unpack_command(layout: Path, dest: Path, ref_name: str | None) -> None:
    """Unpack an example's image into DEST, to run it with chroot (as root)."""
    try:
        config = unpack_image(layout, dest, ref_name)
    except EmberError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(json.dumps(config.get("config", {}), sort_keys=True))


@main.command("list")
def list_command() -> None:
    """The examples this module can build."""
    for name, example in sorted(EXAMPLES.items()):
        click.echo(f"{name}\t{' '.join(example.packages)}")


if __name__ == "__main__":
    main(sys.argv[1:])
