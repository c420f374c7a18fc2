"""The agent's layer extractor on tar files built here: the OCI changeset rules (whiteouts,
opaque directories), what it keeps (ownership, modes, links, devices, xattrs) and what it
refuses (anything that would land outside the root)."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from ember.agent.oci import (
    OCI_LAYER_ZSTD,
    LayerInvalid,
    LayerUnsafe,
    LayerUnsupported,
    Unpacker,
    apply_layer,
)
from ember.client.oci import DigestMismatch
from ember.client.oci.media import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR
from ember.core.errors import Kind

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="ownership and device nodes need root")


# -- building layers ---------------------------------------------------------------------


def f(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, mtime
    return info, data


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, gid, mtime
    return info, None


def sym(name: str, target: str):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info, None


def hard(name: str, target: str):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def dev(name: str, kind: bytes, major: int, minor: int, mode: int = 0o620):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, mode
    return info, None


def wh(name: str):
    return f(name)


def tar_bytes(*entries) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def unpack(root: Path, *layers: bytes, privileged: bool | None = None) -> Unpacker:
    unpacker = Unpacker(root, privileged=privileged)
    for i, layer in enumerate(layers):
        unpacker.apply(io.BytesIO(layer), f"layer {i}")
    unpacker.finish()
    return unpacker


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "rootfs").mkdir()
    return tmp_path / "rootfs"


def tree(root: Path) -> list[str]:
    """Every path below ``root`` (directories with a trailing /)."""
    out = []
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        for name in dirs:
            out.append(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            out.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(out)


# -- the changeset rules ---------------------------------------------------------------


def test_whiteouts_delete_what_lower_layers_left_and_are_never_written(root: Path) -> None:
    lower = tar_bytes(
        d("etc"),
        f("etc/keep", b"k"),
        f("etc/gone", b"g"),
        d("var"),
        d("var/cache"),
        f("var/cache/a", b"a"),
        sym("etc/link", "keep"),
    )
    upper = tar_bytes(wh("etc/.wh.gone"), wh("var/.wh.cache"), wh("etc/.wh.link"))
    stats = unpack(root, lower, upper).stats
    assert tree(root) == ["etc/", "etc/keep", "var/"]
    assert stats.whiteouts == 3 and stats.layers == 2


def test_a_whiteout_spares_what_its_own_layer_writes(root: Path) -> None:
    lower = tar_bytes(d("a"), f("a/x", b"lower"), d("a/dir"), f("a/dir/old", b"old"))
    # The marker after the entries it names, and a directory the same layer re-creates.
    upper = tar_bytes(
        f("a/x", b"upper"), d("a/dir"), f("a/dir/new"), wh("a/.wh.x"), wh("a/.wh.dir")
    )
    unpack(root, lower, upper)
    assert (root / "a" / "x").read_bytes() == b"upper"
    assert tree(root) == ["a/", "a/dir/", "a/dir/new", "a/x"]


@pytest.mark.parametrize("marker_first", [True, False])
def test_an_opaque_directory_hides_only_lower_layers(root: Path, marker_first: bool) -> None:
    lower = tar_bytes(
        d("app"),
        f("app/old.txt", b"old"),
        d("app/sub"),
        f("app/sub/old", b"old"),
        f("app/both", b"lower"),
        d("other"),
        f("other/kept"),
    )
    marker = wh("app/.wh..wh..opq")
    body = [f("app/new.txt", b"new"), f("app/sub/new", b"new"), f("app/both", b"upper")]
    upper = tar_bytes(*([marker, *body] if marker_first else [*body, marker]))
    unpack(root, lower, upper)
    assert tree(root) == [
        "app/",
        "app/both",
        "app/new.txt",
        "app/sub/",
        "app/sub/new",
        "other/",
        "other/kept",
    ]
    assert (root / "app" / "both").read_bytes() == b"upper"


def test_an_opaque_marker_for_a_missing_directory_creates_it(root: Path) -> None:
    unpack(root, tar_bytes(wh("fresh/.wh..wh..opq")))
    assert tree(root) == ["fresh/"]


def test_aufs_metadata_is_ignored(root: Path) -> None:
    unpack(root, tar_bytes(d("x"), f("x/y"), wh(".wh..wh.plnk"), d(".wh..wh.aufs")))
    assert tree(root) == ["x/", "x/y"]


def test_a_file_replaces_a_directory_and_a_directory_a_file(root: Path) -> None:
    lower = tar_bytes(d("was-dir"), f("was-dir/child"), f("was-file", b"x"))
    upper = tar_bytes(f("was-dir", b"now a file"), d("was-file"), f("was-file/child"))
    unpack(root, lower, upper)
    assert (root / "was-dir").read_bytes() == b"now a file"
    assert (root / "was-file" / "child").is_file()


# -- what is kept ----------------------------------------------------------------------


def test_modes_times_and_special_bits_are_kept(root: Path) -> None:
    layer = tar_bytes(
        d("./", mode=0o755),
        d("bin", mode=0o751, mtime=1_000_000),
        f("bin/suid", b"#!", mode=0o4755, mtime=1_234_567),
        f("bin/sgid", b"#!", mode=0o2711),
        d("tmp", mode=0o1777),
        f("secret", b"s", mode=0o400),
        d("ro", mode=0o555),
        f("ro/inside", b"written before the directory became read-only"),
    )
    unpack(root, layer)
    assert stat.S_IMODE(os.lstat(root / "bin" / "suid").st_mode) == 0o4755
    assert os.lstat(root / "bin" / "suid").st_mtime == 1_234_567
    assert stat.S_IMODE(os.lstat(root / "bin" / "sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.lstat(root / "bin").st_mode) == 0o751
    assert os.lstat(root / "bin").st_mtime == 1_000_000, "directory times are set last"
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.lstat(root / "secret").st_mode) == 0o400
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o755


def test_a_later_layer_can_write_into_a_read_only_directory(root: Path) -> None:
    unpack(root, tar_bytes(d("ro", mode=0o555)), tar_bytes(f("ro/added", b"x")))
    assert (root / "ro" / "added").read_bytes() == b"x"
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555


@needs_root
def test_ownership_is_kept_as_root(root: Path) -> None:
    layer = tar_bytes(
        d("home", uid=0, gid=0),
        d("home/app", mode=0o700, uid=1000, gid=1001),
        f("home/app/suid", b"x", mode=0o4750, uid=1000, gid=1001),
        sym("home/app/link", "suid"),
    )
    link_info = sym("home/app/owned-link", "suid")[0]
    link_info.uid, link_info.gid = 4242, 4343
    extra = tar_bytes((link_info, None))
    unpack(root, layer, extra)
    st = os.lstat(root / "home" / "app" / "suid")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert stat.S_IMODE(st.st_mode) == 0o4750, "the mode is applied after chown"
    st = os.lstat(root / "home" / "app")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o700)
    st = os.lstat(root / "home" / "app" / "owned-link")
    assert (st.st_uid, st.st_gid) == (4242, 4343)


def test_unprivileged_unpacking_skips_ownership_and_devices_and_counts_them(root: Path) -> None:
    layer = tar_bytes(f("file", b"x", uid=1000, gid=1000), dev("null", tarfile.CHRTYPE, 1, 3))
    stats = unpack(root, layer, privileged=False).stats
    assert not os.path.lexists(root / "null")
    assert stats.skipped_devices == 1 and stats.skipped_ownership == 1
    assert os.lstat(root / "file").st_uid == os.geteuid()


@needs_root
def test_device_nodes_and_fifos_are_created_as_root(root: Path) -> None:
    layer = tar_bytes(
        d("dev"),
        dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        dev("dev/loop9", tarfile.BLKTYPE, 7, 9),
        dev("fifo", tarfile.FIFOTYPE, 0, 0, mode=0o600),
    )
    unpack(root, layer)
    st = os.lstat(root / "dev" / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(root / "dev" / "loop9").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)


@needs_root
def test_extended_attributes_are_kept_as_root(root: Path) -> None:
    info, data = f("bin/ping", b"\x7fELF", mode=0o755)
    # A file capability (cap_net_raw+ep), as `setcap` writes it, and a user xattr.
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.origin": "layer",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
    }
    try:
        os.setxattr(root, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("the test filesystem has no user xattrs")
        raise
    unpack(root, tar_bytes(d("bin"), (info, data)))
    path = root / "bin" / "ping"
    assert os.getxattr(path, "security.capability") == cap
    assert os.getxattr(path, "user.origin") == b"layer"
    assert "trusted.overlay.opaque" not in os.listxattr(path)


def test_symlinks_are_kept_as_they_are(root: Path) -> None:
    layer = tar_bytes(
        d("bin"),
        f("bin/busybox", b"bb", mode=0o755),
        sym("bin/sh", "busybox"),
        sym("bin/abs", "/bin/busybox"),
        sym("dangling", "/nowhere/at/all"),
        sym("up", "../../../../etc"),
    )
    unpack(root, layer)
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert os.readlink(root / "bin" / "abs") == "/bin/busybox"
    assert os.readlink(root / "dangling") == "/nowhere/at/all"
    assert os.readlink(root / "up") == "../../../../etc", "a link is data until followed"


def test_hard_links_share_an_inode_within_and_across_layers(root: Path) -> None:
    lower = tar_bytes(d("bin"), f("bin/busybox", b"bb", mode=0o755), hard("bin/ls", "bin/busybox"))
    upper = tar_bytes(hard("bin/cat", "./bin/busybox"))
    unpack(root, lower, upper)
    inode = os.lstat(root / "bin" / "busybox").st_ino
    assert os.lstat(root / "bin" / "ls").st_ino == inode
    assert os.lstat(root / "bin" / "cat").st_ino == inode
    assert os.lstat(root / "bin" / "busybox").st_nlink == 3


def test_a_hard_link_to_nothing_or_to_a_directory_is_invalid(root: Path) -> None:
    with pytest.raises(LayerInvalid):
        unpack(root, tar_bytes(hard("x", "missing")))
    with pytest.raises(LayerInvalid):
        unpack(root, tar_bytes(d("dir"), hard("x", "dir")))


def test_entries_under_an_in_image_symlink_follow_it_inside_the_root(root: Path) -> None:
    """Merged /usr: ``lib -> usr/lib`` in one layer, ``lib/x`` in the next lands in
    usr/lib; an absolute link target is the image's own root, never the host's."""
    lower = tar_bytes(d("usr"), d("usr/lib"), sym("lib", "usr/lib"), sym("abs", "/usr"))
    upper = tar_bytes(f("lib/libx.so", b"x"), f("abs/share-it", b"y"))
    unpack(root, lower, upper)
    assert (root / "usr" / "lib" / "libx.so").read_bytes() == b"x"
    assert (root / "usr" / "share-it").read_bytes() == b"y"
    assert os.readlink(root / "lib") == "usr/lib"


def test_a_file_written_over_a_symlink_replaces_the_link(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"host file")
    unpack(
        root,
        tar_bytes(d("etc"), sym("etc/passwd", str(outside)), sym("etc/rel", "../../outside")),
        tar_bytes(f("etc/passwd", b"root:x:0:0\n"), f("etc/rel", b"r")),
    )
    assert outside.read_bytes() == b"host file"
    assert not (root / "etc" / "passwd").is_symlink()
    assert (root / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"


# -- what is refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "reason"),
    [
        ([tar_bytes(f("/etc/passwd", b"x"))], "absolute"),
        ([tar_bytes(f("../escaped", b"x"))], "dotdot"),
        ([tar_bytes(d("a"), f("a/../../escaped", b"x"))], "dotdot"),
        ([tar_bytes(f("x"), hard("h", "../../outside"))], "dotdot"),
        ([tar_bytes(f("x"), hard("h", "/etc/passwd"))], "absolute"),
        # A symlinked directory leading out, then an entry below it (same or later layer).
        ([tar_bytes(sym("evil", "../../.."), f("evil/escaped", b"x"))], "symlink"),
        ([tar_bytes(d("a"), sym("a/up", "../..")), tar_bytes(f("a/up/escaped", b"x"))], "symlink"),
        ([tar_bytes(sym("evil", "..")), tar_bytes(wh("evil/.wh.victim"))], "symlink"),
        ([tar_bytes(sym("evil", "..")), tar_bytes(hard("h", "evil/outside"))], "symlink"),
        ([tar_bytes(sym("loop", "loop"), f("loop/x"))], "loop"),
        ([tar_bytes(wh("etc/.wh.."))], "whiteout"),
        ([tar_bytes(wh(".wh."))], "whiteout"),
    ],
)
def test_anything_leading_out_of_the_root_is_refused(
    tmp_path: Path, layers: list[bytes], reason: str
) -> None:
    base = tmp_path / "deep" / "er"
    root = base / "rootfs"
    root.mkdir(parents=True)
    (tmp_path / "outside").write_bytes(b"host")
    (tmp_path / "deep" / "victim").write_bytes(b"host")
    before = sorted(p.name for p in tmp_path.rglob("*") if root not in p.parents)
    with pytest.raises(LayerUnsafe) as err:
        unpack(root, *layers)
    assert err.value.code == "image.layer_unsafe"
    assert err.value.kind is Kind.INVALID
    assert err.value.detail["reason"] == reason
    after = sorted(p.name for p in tmp_path.rglob("*") if root not in p.parents)
    assert after == before, "nothing was written or deleted outside the root"
    assert (tmp_path / "deep" / "victim").read_bytes() == b"host"


def test_a_file_where_a_directory_is_needed_is_invalid(root: Path) -> None:
    with pytest.raises(LayerInvalid):
        unpack(root, tar_bytes(f("file"), f("file/child")))


def test_garbage_is_an_invalid_layer(root: Path) -> None:
    with pytest.raises(LayerInvalid):
        unpack(root, b"\x00not a tar at all" * 100)


# -- compressed blobs and digests -------------------------------------------------------

LAYER = tar_bytes(d("www"), f("www/index.html", b"<h1>hi</h1>\n"))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("media_type", "pack"),
    [
        (OCI_LAYER_TAR, lambda b: b),
        (OCI_LAYER_GZIP, gzip.compress),
        (DOCKER_LAYER_GZIP, gzip.compress),
        # Two gzip members: still one layer.
        (OCI_LAYER_GZIP, lambda b: gzip.compress(b[:700]) + gzip.compress(b[700:])),
    ],
)
def test_apply_layer_decompresses_and_checks_both_digests(
    root: Path, tmp_path: Path, media_type: str, pack
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(pack(LAYER))
    unpacker = Unpacker(root)
    data = blob.read_bytes()
    apply_layer(unpacker, blob, media_type, digest=sha(data), size=len(data), diff_id=sha(LAYER))
    assert (root / "www" / "index.html").read_bytes() == b"<h1>hi</h1>\n"


def test_zstd_layers_are_unpacked_with_the_zstd_program(root: Path, tmp_path: Path) -> None:
    # zstd is a required package: a missing one is a broken bootstrap, not a skip.
    assert shutil.which("zstd"), "zstd is missing: run make bootstrap"
    (tmp_path / "layer.tar").write_bytes(LAYER)
    subprocess.run(["zstd", "-q", str(tmp_path / "layer.tar")], check=True)
    blob = tmp_path / "layer.tar.zst"
    data = blob.read_bytes()
    apply_layer(
        Unpacker(root), blob, OCI_LAYER_ZSTD, digest=sha(data), size=len(data), diff_id=sha(LAYER)
    )
    assert (root / "www" / "index.html").read_bytes() == b"<h1>hi</h1>\n"
    # A damaged zstd stream is an invalid layer.
    bad = tmp_path / "bad.zst"
    bad.write_bytes(data[:10] + b"\x00" * 30)
    with pytest.raises(LayerInvalid):
        apply_layer(Unpacker(tmp_path / "other"), bad, OCI_LAYER_ZSTD)


def test_a_blob_that_does_not_match_its_digest_is_refused(root: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(LAYER))
    with pytest.raises(DigestMismatch) as err:
        apply_layer(Unpacker(root), blob, OCI_LAYER_GZIP, digest=sha(b"other"), size=None)
    assert err.value.code == "oci.digest_mismatch"


def test_a_layer_whose_tar_does_not_match_its_diff_id_is_refused(
    root: Path, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(LAYER))
    with pytest.raises(DigestMismatch) as err:
        apply_layer(Unpacker(root), blob, OCI_LAYER_GZIP, diff_id=sha(b"another tar"))
    assert err.value.detail["digest"] == sha(b"another tar")


def test_a_truncated_gzip_layer_is_invalid(root: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(LAYER * 50)[:200])
    with pytest.raises(LayerInvalid):
        apply_layer(Unpacker(root), blob, OCI_LAYER_GZIP)


def test_an_unknown_layer_media_type_is_unsupported(root: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(LAYER)
    with pytest.raises(LayerUnsupported) as err:
        apply_layer(Unpacker(root), blob, "application/vnd.example.layer.v1+squashfs")
    assert err.value.code == "image.layer_unsupported"
    assert not list(root.iterdir())


def test_a_damaged_blob_is_a_digest_mismatch_even_when_it_no_longer_unpacks(
    root: Path, tmp_path: Path
) -> None:
    """A cached blob that rotted on disk fails to decompress first; the integrity error
    is what the caller must see (it evicts the copy), not an invalid image."""
    good = gzip.compress(LAYER * 20)
    blob = tmp_path / "blob"
    blob.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    with pytest.raises(DigestMismatch) as err:
        apply_layer(Unpacker(root), blob, OCI_LAYER_GZIP, digest=sha(good), size=len(good))
    assert isinstance(err.value.__cause__, LayerInvalid)
