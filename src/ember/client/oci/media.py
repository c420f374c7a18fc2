"""OCI media types, descriptors, digests and canonical JSON. Pure: no I/O.

A *descriptor* names content by ``(mediaType, digest, size)``; everything that moves
between a layout, an archive and a registry is addressed this way, and every reader
checks both the digest and the size before it trusts a byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ember.client.oci.errors import DigestMismatch, InvalidReference, LayoutInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFESTS = IMAGE_MANIFESTS | INDEXES
# What a registry client accepts for a manifest GET, most preferred first.
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

REF_NAME = "org.opencontainers.image.ref.name"
# Manifests larger than this are refused unread: a registry limits them to 4 MiB too.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """``digest`` if it is a sha256 digest in canonical form; else InvalidReference.

    Only sha256 is accepted: it is what every registry and builder here produces, and one
    algorithm means one code path to verify."""
    if not _DIGEST.match(digest):
        raise InvalidReference(
            f"not a sha256 digest: {digest!r}",
            hint="a digest looks like sha256:<64 lowercase hex digits>",
            detail={"field": "digest"},
        )
    return digest


def canonical_json(value: Any) -> bytes:
    """The bytes the builder writes for a JSON document: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls, media_type: str, data: bytes, annotations: Mapping[str, str] | None = None
    ) -> Descriptor:
        return cls(media_type, sha256_digest(data), len(data), dict(annotations or {}))

    @classmethod
    def from_json(cls, value: Any, where: str = "descriptor") -> Descriptor:
        if not isinstance(value, dict):
            raise LayoutInvalid(f"{where}: not a JSON object")
        media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise LayoutInvalid(f"{where}.mediaType: missing")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayoutInvalid(f"{where}.size: not a non-negative integer")
        try:
            digest = check_digest(str(digest))
        except InvalidReference as exc:
            raise LayoutInvalid(f"{where}.digest: {exc.message}") from exc
        annotations = value.get("annotations") or {}
        platform = value.get("platform")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise LayoutInvalid(f"{where}.annotations: not an object of strings")
        if platform is not None and not isinstance(platform, dict):
            raise LayoutInvalid(f"{where}.platform: not an object")
        return cls(
            media_type,
            digest,
            size,
            {str(k): str(v) for k, v in annotations.items()},
            dict(platform) if isinstance(platform, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME)

    def with_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        return dataclasses.replace(self, annotations=dict(annotations))


def verify_bytes(data: bytes, expected: Descriptor | str, source: str) -> None:
    """Raise DigestMismatch unless ``data`` is the content ``expected`` names."""
    digest = expected if isinstance(expected, str) else expected.digest
    size = None if isinstance(expected, str) else expected.size
    actual = sha256_digest(data)
    if actual != digest or (size is not None and size != len(data)):
        raise mismatch(source, digest, size, actual=actual, actual_size=len(data))


def mismatch(
    source: str,
    digest: str,
    size: int | None,
    *,
    actual: str | None = None,
    actual_size: int | None = None,
) -> DigestMismatch:
    what = (
        f"{actual_size} bytes where {size} were expected"
        if size is not None and actual_size is not None and actual_size != size
        else f"content hashing to {actual}"
    )
    return DigestMismatch(
        f"{source} sent {what} for {digest}: corrupt or tampered content, not used",
        hint="the source is corrupt or was tampered with; re-push the image, or report it",
        detail={
            "digest": digest,
            "size": size,
            "actual": actual,
            "actual_size": actual_size,
            "source": source,
        },
    )


def parse_manifest(data: bytes, media_type: str | None, where: str) -> dict[str, Any]:
    """The manifest or index as a dict with a known ``mediaType`` filled in."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise LayoutInvalid(f"{where}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise LayoutInvalid(f"{where}: not a JSON object")
    declared = doc.get("mediaType")
    kind = declared or media_type
    if kind is None or kind == "application/json":  # a bare OCI document: guess by shape
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if kind not in MANIFESTS:
        raise LayoutInvalid(
            f"{where}: unsupported manifest media type {kind!r}",
            hint="Ember reads OCI and Docker v2 (schema 2) images; re-push with a current tool",
            detail={"media_type": kind},
        )
    if doc.get("schemaVersion") != 2:
        raise LayoutInvalid(f"{where}: schemaVersion must be 2")
    doc["mediaType"] = kind
    return doc


def children(doc: Mapping[str, Any], where: str) -> tuple[list[Descriptor], list[Descriptor]]:
    """``(blobs, manifests)`` a parsed manifest or index refers to, in document order."""
    if doc["mediaType"] in INDEXES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise LayoutInvalid(f"{where}.manifests: not a list")
        return [], [
            Descriptor.from_json(e, f"{where}.manifests[{i}]") for i, e in enumerate(entries)
        ]
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise LayoutInvalid(f"{where}.layers: not a list")
    blobs = [Descriptor.from_json(doc.get("config"), f"{where}.config")]
    blobs += [Descriptor.from_json(e, f"{where}.layers[{i}]") for i, e in enumerate(layers)]
    return blobs, []


def platform_matches(desc: Descriptor, platform: str | None) -> bool:
    """Does an index entry match ``os/arch[/variant]`` (None matches everything)?"""
    if platform is None or desc.platform is None:
        return True
    parts = platform.split("/")
    want = dict(zip(("os", "architecture", "variant"), parts, strict=False))
    return all(desc.platform.get(k) == v for k, v in want.items())


def index_document(manifests: Sequence[Descriptor]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [m.to_json() for m in manifests],
    }
