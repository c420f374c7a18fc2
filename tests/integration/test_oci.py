"""The OCI builder, layouts and archives on a real filesystem (no registry needed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from ember.client.oci import (
    DigestMismatch,
    ImageConfig,
    LayoutInvalid,
    OciLayout,
    build_image,
    import_archive,
    write_archive,
)
from ember.client.oci.media import OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, sha256_digest
from ember.core.errors import Kind

CONFIG = ImageConfig(
    entrypoint=["/bin/app"],
    cmd=["--port", "8080"],
    env={"PATH": "/bin", "GREETING": "hello world"},
    working_dir="/srv",
    user="65534:65534",
    exposed_ports=["8080", "9000/udp"],
    labels={"example": "yes"},
)


def make_tree(root: Path) -> Path:
    """A directory with every kind of entry the builder handles."""
    (root / "bin").mkdir(parents=True)
    (root / "srv" / "www" / "deep").mkdir(parents=True)
    app = root / "bin" / "app"
    app.write_bytes(b"#!/bin/sh\necho hi\n")
    app.chmod(0o755)
    (root / "bin" / "suid").write_bytes(b"x")
    (root / "bin" / "suid").chmod(0o4755)
    (root / "bin" / "sh").symlink_to("app")
    (root / "bin" / "abs").symlink_to("/bin/app")
    (root / "srv" / "www" / "index.html").write_text("<h1>hi</h1>\n")
    os.link(root / "srv" / "www" / "index.html", root / "srv" / "www" / "copy.html")
    (root / "srv" / "www" / "deep" / "z.txt").write_text("z" * 5000)
    (root / "srv" / "a-file").write_text("sorts between srv/ and srv/www")
    os.mkfifo(root / "srv" / "fifo")
    (root / "empty").mkdir()
    return root


def layer_members(layout: OciLayout, desc: Descriptor) -> list[tarfile.TarInfo]:
    with (
        layout.open_blob(desc) as f,
        tarfile.open(fileobj=f, mode="r:gz") as tar,
    ):
        return tar.getmembers()


def test_builder_is_deterministic_and_ignores_times(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    first = build_image(tmp_path / "one", [tree], CONFIG)
    # Touch everything (mtime, atime): nothing the builder writes may depend on it.
    later = time.time() + 3600
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink() and not path.is_fifo():
            os.utime(path, (later, later))
    second = build_image(tmp_path / "two", [tree], CONFIG)
    assert first.digest == second.digest
    one, two = OciLayout.open(tmp_path / "one"), OciLayout.open(tmp_path / "two")
    assert sorted(p.name for p in one.blobs_dir.iterdir()) == sorted(
        p.name for p in two.blobs_dir.iterdir()
    )
    assert (tmp_path / "one" / "index.json").read_bytes() == (
        tmp_path / "two" / "index.json"
    ).read_bytes()

    # Content changes change the digest.
    (tree / "srv" / "www" / "deep" / "z.txt").write_text("y" * 5000)
    assert build_image(tmp_path / "three", [tree], CONFIG).digest != first.digest


def test_layer_entries_are_normalised(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    layout = OciLayout.create(tmp_path / "layout")
    desc = build_image(layout, [tree], CONFIG)
    manifest = layout.manifest(desc)
    assert manifest["mediaType"] == OCI_MANIFEST
    (layer,) = [Descriptor.from_json(x) for x in manifest["layers"]]
    assert layer.media_type == OCI_LAYER_GZIP
    raw = layout.read_blob(layer)
    assert raw[4:8] == b"\0\0\0\0", "gzip header mtime is 0"
    members = layer_members(layout, layer)
    names = [m.name for m in members]
    assert names == [  # `tar --sort=name` order
        "bin",
        "bin/abs",
        "bin/app",
        "bin/sh",
        "bin/suid",
        "empty",
        "srv",
        "srv/a-file",
        "srv/fifo",
        "srv/www",
        "srv/www/copy.html",
        "srv/www/deep",
        "srv/www/deep/z.txt",
        "srv/www/index.html",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert not {"atime", "ctime"} & set(m.pax_headers)
    by_name = {m.name: m for m in members}
    assert by_name["bin/suid"].mode == 0o4755
    assert by_name["bin/app"].mode == 0o755
    assert by_name["bin/abs"].issym() and by_name["bin/abs"].linkname == "/bin/app"
    assert by_name["srv/fifo"].isfifo()
    # The first of two hard-linked names (in archive order) holds the bytes.
    assert by_name["srv/www/copy.html"].isfile()
    assert by_name["srv/www/index.html"].islnk()
    assert by_name["srv/www/index.html"].linkname == "srv/www/copy.html"

    # The config says what to run, and its diff_id is the uncompressed layer's sha256.
    config = layout.image_config(desc)
    assert config["config"] == {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--port", "8080"],
        "Env": ["PATH=/bin", "GREETING=hello world"],
        "WorkingDir": "/srv",
        "User": "65534:65534",
        "ExposedPorts": {"8080/tcp": {}, "9000/udp": {}},
        "Labels": {"example": "yes"},
    }
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert "created" not in config
    assert config["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(raw))]


def test_layout_round_trip_through_an_oci_archive(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    app = tmp_path / "app"
    (app / "etc").mkdir(parents=True)
    (app / "etc" / "motd").write_text("two layers\n")
    layout = OciLayout.create(tmp_path / "layout")
    desc = build_image(layout, [tree, app], CONFIG, ref_name="v1")
    assert OciLayout.open(tmp_path / "layout").resolve("v1") == desc
    assert layout.resolve() == desc
    blobs = layout.verify()
    assert len(blobs) == 4  # 2 layers, config, manifest

    archive = tmp_path / "image.tar"
    write_archive(layout, archive, repo_tags=["hello:v1"])
    again = tmp_path / "again.tar"
    write_archive(layout, again, repo_tags=["hello:v1"])
    assert archive.read_bytes() == again.read_bytes(), "archives are deterministic too"
    with tarfile.open(archive) as tar:
        docker = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert docker[0]["RepoTags"] == ["hello:v1"]
    assert len(docker[0]["Layers"]) == 2

    imported, images = import_archive(archive, tmp_path / "imported")
    assert [i.digest for i in images] == [desc.digest]
    assert imported.resolve("v1").digest == desc.digest
    for blob in blobs:
        assert imported.read_blob(blob) == layout.read_blob(blob)

    with pytest.raises(LayoutInvalid) as missing:
        imported.resolve("nope")
    assert missing.value.code == "oci.layout_invalid"
    assert missing.value.detail["names"] == ["v1"]


def test_a_tampered_layout_blob_is_detected(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    desc = build_image(layout, [make_tree(tmp_path / "tree")], CONFIG)
    layer = Descriptor.from_json(layout.manifest(desc)["layers"][0])
    path = layout.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch) as err:
        layout.verify()
    assert err.value.code == "oci.digest_mismatch"
    assert err.value.kind is Kind.INTERNAL
    assert err.value.detail["digest"] == layer.digest
    # Nor does an archive carry it on: writing one verifies as it goes.
    with pytest.raises(DigestMismatch):
        write_archive(layout, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def _docker_save_tar(tmp_path: Path, *, compress: bool, bad_diff_id: bool = False) -> Path:
    """What `docker save` (before Docker 25) writes: manifest.json, <id>.json, <id>/layer.tar."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        data = b"from docker\n"
        info = tarfile.TarInfo("etc/hello")
        info.size = len(data)
        layer.addfile(info, io.BytesIO(data))
    layer_tar = layer_buf.getvalue()
    diff_id = sha256_digest(b"tampered" if bad_diff_id else layer_tar)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["cat", "/etc/hello"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": ["hello:latest"], "Layers": ["abc/layer.tar"]}]
    ).encode()
    path = tmp_path / ("save.tar.gz" if compress else "save.tar")
    with tarfile.open(path, mode="w:gz" if compress else "w") as tar:
        for name, content in (
            ("manifest.json", manifest),
            (config_name, config),
            ("abc/layer.tar", layer_tar),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_docker_save_archive_import(tmp_path: Path, compress: bool) -> None:
    archive = _docker_save_tar(tmp_path, compress=compress)
    layout, images = import_archive(archive, tmp_path / "layout")
    (image,) = images
    assert image.ref_name == "hello:latest"
    assert layout.resolve("hello:latest").digest == image.digest
    config = layout.image_config(image)
    assert config["config"]["Cmd"] == ["cat", "/etc/hello"]
    layer = Descriptor.from_json(layout.manifest(image)["layers"][0])
    assert layer.media_type == OCI_LAYER_GZIP
    with layout.open_blob(layer) as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
        assert tar.extractfile("etc/hello").read() == b"from docker\n"  # type: ignore[union-attr]
    assert config["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(layout.read_blob(layer)))]
    # Importing again gives the same image (deterministic compression).
    _, again = import_archive(archive, tmp_path / "layout2")
    assert again[0].digest == image.digest


def test_docker_save_archive_with_a_wrong_diff_id_is_refused(tmp_path: Path) -> None:
    archive = _docker_save_tar(tmp_path, compress=False, bad_diff_id=True)
    with pytest.raises(DigestMismatch):
        import_archive(archive, tmp_path / "layout")
    layout = OciLayout.open(tmp_path / "layout")
    assert layout.index() == []


def test_not_an_archive_or_layout(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(LayoutInvalid) as err:
        import_archive(junk, tmp_path / "out")
    assert err.value.kind is Kind.INVALID
    with pytest.raises(LayoutInvalid):
        OciLayout.open(tmp_path)
