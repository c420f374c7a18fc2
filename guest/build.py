#!/usr/bin/env python3
"""Build Ember's guest boot artifacts: the platform kernel, init and initramfs.

    python3 guest/build.py [--out DIR] [--force]

Outputs in DIR (default ``guest/build``, see guest/README.md)::

    vmlinux          the kernel: ELF, PVH entry, from Debian's linux-image-cloud-amd64
    initrd.gz        the initramfs (gzip'd newc cpio): /init + the virtio modules
    init             the platform init (static), also inside initrd.gz
    manifest.json    what was built from what (package, version, sha256 of every output)
    cache/           the downloaded kernel .deb

Idempotent: the inputs (kernel package version, init.c, this script) are recorded in
manifest.json and a build whose inputs are unchanged does nothing.  When apt cannot name
the kernel package (no package lists yet, no mirror) an existing build is kept.

Standard library only; needs apt-get, dpkg-deb, lz4 and gcc (scripts/debian-packages.txt).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SRC = HERE / "init" / "init.c"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s"]
# What the init loads (finit_module), dependencies first; see docs/specs/guest-config.md.
# button + evdev: QEMU's `system_powerdown` arrives as an ACPI power-button key press.
MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "button", "evdev")
LZ4_LEGACY_MAGIC = bytes.fromhex("02214c18")
FORMAT = 1  # bump to force a rebuild when the output layout changes


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"guest: {msg}", file=sys.stderr, flush=True)  # noqa: T201 - a build script


def run(argv: list[str], **kw: object) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} is not installed (run 'make bootstrap')") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"{' '.join(argv[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return str(proc.stdout)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- the kernel package ----------------------------------------------------------------


def resolve_kernel_package() -> dict[str, str]:
    """The concrete image package the meta package points at, with its index data."""
    out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", KERNEL_PACKAGE])
    deps = [
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not deps:
        raise BuildError(f"apt names no kernel image behind {KERNEL_PACKAGE}")
    name = deps[0]
    fields: dict[str, str] = {}
    for line in run(["apt-cache", "show", "--no-all-versions", name]).splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line[0].isspace():
            fields.setdefault(key, value.strip())
    if "Version" not in fields:
        raise BuildError(f"apt knows no version of {name}")
    return {
        "name": name,
        "version": fields["Version"],
        "architecture": fields.get("Architecture", "amd64"),
        "sha256": fields.get("SHA256", ""),
    }


def fetch_deb(pkg: dict[str, str], cache: Path) -> Path:
    """The package's .deb in ``cache``, downloaded with apt-get and checked against apt."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / f"{pkg['name']}_{pkg['version'].replace(':', '%3a')}_{pkg['architecture']}.deb"
    if deb.exists() and (not pkg["sha256"] or sha256(deb) == pkg["sha256"]):
        return deb
    log(f"downloading {pkg['name']} {pkg['version']}")
    user = "root" if os.getuid() == 0 else ""
    run(
        [
            "apt-get",
            "download",
            "-q",
            "-o",
            f"APT::Sandbox::User={user}",
            f"{pkg['name']}={pkg['version']}",
        ],
        cwd=cache,
    )
    if not deb.exists() or (pkg["sha256"] and sha256(deb) != pkg["sha256"]):
        raise BuildError(f"{deb.name} does not match the sha256 of apt's index")
    return deb


# -- vmlinux -------------------------------------------------------------------------------


def elf_end(data: bytes) -> int:
    """The end of an ELF64 image's last program segment or section table (checks it is one)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("the decompressed kernel is not a little-endian ELF64 file")
    phoff = int.from_bytes(data[32:40], "little")
    shoff = int.from_bytes(data[40:48], "little")
    phentsize, phnum = (int.from_bytes(data[o : o + 2], "little") for o in (54, 56))
    shentsize, shnum = (int.from_bytes(data[o : o + 2], "little") for o in (58, 60))
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for i in range(phnum):
        ph = data[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        offset = int.from_bytes(ph[8:16], "little")
        filesz = int.from_bytes(ph[32:40], "little")
        end = max(end, offset + filesz)
    if end > len(data):
        raise BuildError("the decompressed kernel is truncated")
    return end


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """bzImage -> ELF vmlinux: the payload is legacy-LZ4 (CONFIG_KERNEL_LZ4)."""
    data = vmlinuz.read_bytes()
    at = data.find(LZ4_LEGACY_MAGIC)
    if at < 0:
        raise BuildError(f"{vmlinuz.name}: no LZ4 payload (magic 02 21 4c 18) found")
    # lz4 decodes the whole payload and then complains (exit 1) about the bzImage's
    # trailing bytes; the ELF check below is what decides.
    proc = subprocess.run(["lz4", "-dc"], input=data[at:], capture_output=True, check=False)
    kernel = proc.stdout
    end = elf_end(kernel)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(kernel[:end])
    tmp.replace(out)


# -- modules ---------------------------------------------------------------------------------


def modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9 : data.index(b"\0", at + 9)].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def module_order(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``wanted`` and their dependencies, each after everything it depends on."""
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in path:
            raise BuildError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in index:
            raise BuildError(f"module {name} is not in the kernel package")
        for dep in modinfo_depends(index[name]):
            visit(dep, (*path, name))
        seen.add(name)
        order.append((name, index[name]))

    for name in wanted:
        visit(name, ())
    return order


# -- initramfs (newc cpio) -----------------------------------------------------------------


class Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initrd(init: Path, modules: list[tuple[str, Path]], out: Path) -> None:
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.dir(d)
    # The kernel opens /dev/console for PID 1's stdio before /dev is mounted.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("init", init.read_bytes(), 0o755)
    for name, path in modules:
        cpio.file(f"lib/modules/{name}.ko", path.read_bytes())
    cpio.file("lib/modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode())
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(cpio.finish())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(raw.getvalue())
    tmp.replace(out)


def compile_init(out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    run(["gcc", *CFLAGS, "-o", str(tmp), str(INIT_SRC)])
    tmp.replace(out)


# -- the build -------------------------------------------------------------------------------


def inputs_key(pkg: dict[str, str]) -> dict[str, object]:
    return {**local_key(), "kernel_package": pkg}


def complete(out: Path) -> dict[str, object] | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if all((out / f).is_file() for f in ("vmlinux", "initrd.gz", "init")):
        return dict(manifest)
    return None


def apt_lists_fingerprint() -> str:
    """Changes whenever ``apt-get update`` brings new package lists."""
    h = hashlib.sha256()
    lists = Path("/var/lib/apt/lists")
    for p in sorted(lists.glob("*_Packages*")) if lists.is_dir() else []:
        st = p.stat()
        h.update(f"{p.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def local_key() -> dict[str, object]:
    """Everything but the kernel package: cheap to compute, no apt involved."""
    return {
        "format": FORMAT,
        "init_c_sha256": sha256(INIT_SRC),
        "build_py_sha256": sha256(Path(__file__).resolve()),
        "modules": list(MODULES),
    }


def write_manifest(out: Path, manifest: dict[str, object]) -> None:
    tmp = out / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "manifest.json")


def build(out: Path, *, force: bool = False) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    existing = complete(out)
    lists = apt_lists_fingerprint()
    # Asking apt costs a second or two; with the same package lists it would answer the same.
    inputs = existing.get("inputs") if existing is not None else None
    old_local = (
        {k: v for k, v in inputs.items() if k != "kernel_package"}
        if isinstance(inputs, dict)
        else None
    )
    if (
        existing is not None
        and not force
        and existing.get("apt_lists") == lists
        and old_local == local_key()
    ):
        log(f"up to date in {out}")
        return existing
    try:
        pkg = resolve_kernel_package()
    except BuildError as exc:
        if existing is not None and not force:
            log(f"keeping the existing build ({exc})")
            return existing
        if os.getuid() != 0:
            raise BuildError(f"{exc}; run 'apt-get update' once") from exc
        # A machine whose package lists were never fetched (or were cleaned).
        log(f"{exc}; running apt-get update")
        run(["apt-get", "update", "-q"])
        lists = apt_lists_fingerprint()
        pkg = resolve_kernel_package()
    key = inputs_key(pkg)
    if existing is not None and existing.get("inputs") == key and not force:
        existing["apt_lists"] = lists
        write_manifest(out, existing)
        log(f"up to date in {out}")
        return existing

    deb = fetch_deb(pkg, out / "cache")
    with tempfile.TemporaryDirectory(prefix="ember-guest-") as tmp:
        root = Path(tmp)
        run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        moddirs = sorted((root / "lib/modules").iterdir())
        if len(vmlinuz) != 1 or len(moddirs) != 1:
            raise BuildError(f"{deb.name}: expected one vmlinuz and one module tree")
        log(f"extracting vmlinux from {vmlinuz[0].name}")
        extract_vmlinux(vmlinuz[0], out / "vmlinux")
        modules = module_order(moddirs[0], MODULES)
        log("compiling init")
        compile_init(out / "init")
        build_initrd(out / "init", modules, out / "initrd.gz")
        kernel_release = moddirs[0].name

    manifest: dict[str, object] = {
        "inputs": key,
        "apt_lists": lists,
        "kernel_release": kernel_release,
        "modules": [name for name, _ in modules],
        "files": {f: sha256(out / f) for f in ("vmlinux", "initrd.gz", "init")},
    }
    write_manifest(out, manifest)
    log(f"built {kernel_release} into {out}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "build")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # Concurrent builds (parallel test runs) wait for each other, then find it done.
        with (out / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            build(out, force=args.force)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
