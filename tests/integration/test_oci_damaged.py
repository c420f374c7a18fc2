"""Damaged archives and layers are bad input (LayoutInvalid), never a crash."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from ember.client.oci import (
    ImageConfig,
    LayoutInvalid,
    OciLayout,
    build_image,
    import_archive,
    write_archive,
)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "www").mkdir(parents=True)
    (root / "www" / "index.html").write_text("hi" * 1000)
    build_image(tmp_path / "layout", [root], ImageConfig(cmd=["true"]))
    out = tmp_path / "image.tar"
    write_archive(OciLayout.open(tmp_path / "layout"), out)
    return out


def test_truncated_archives_never_crash(archive: Path, tmp_path: Path) -> None:
    """Cut anywhere: either a clear LayoutInvalid, or (when only bytes no image needs were
    lost, like trailing padding) a complete import whose every blob verifies."""
    data = archive.read_bytes()
    refused = 0
    for i, cut in enumerate(range(0, len(data), max(1, len(data) // 40))):
        damaged = tmp_path / f"damaged-{i}.tar"
        damaged.write_bytes(data[:cut])
        try:
            layout, images = import_archive(damaged, tmp_path / f"out-{i}")
        except LayoutInvalid:
            refused += 1
        else:
            assert images and all(layout.verify(image) is not None for image in images)
    assert refused >= 20, "most cuts lose something the image needs"


def test_a_truncated_gzip_archive_is_layout_invalid(archive: Path, tmp_path: Path) -> None:
    packed = gzip.compress(archive.read_bytes())
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(LayoutInvalid):
        import_archive(damaged, tmp_path / "out")
