"""Errors of the agent's image preparation (pull, unpack, root filesystem, cache).

Registry and integrity errors are the client's (``ember.client.oci.errors``): a blob or
manifest whose bytes do not match its digest is ``oci.digest_mismatch`` wherever it is
found (the registry, or the agent's own cache on disk), and registry answers keep their
``oci.*`` codes. What is specific to turning an image into a root filesystem::

    ImageError                 image.error              (kind INTERNAL)
    ├── LayerUnsafe            image.layer_unsafe       (ValidationFailed) an entry that
    │                                                   would land outside the root: an
    │                                                   absolute path, ``..``, a link or
    │                                                   symlinked directory leading out,
    │                                                   a whiteout naming ``.``/``..``
    ├── LayerInvalid           image.layer_invalid      (ValidationFailed) not a readable
    │                                                   tar / gzip / zstd stream, or an
    │                                                   entry that cannot be applied
    ├── LayerUnsupported       image.layer_unsupported  (ValidationFailed) a layer media
    │                                                   type this host cannot unpack
    ├── PlatformUnavailable    image.no_platform        (NotFound) no linux/amd64 image
    ├── RootfsBuildFailed      image.rootfs_failed      (kind INTERNAL) mkfs.ext4 failed
    └── ToolMissing            image.tool_missing       (Unavailable) mkfs.ext4 / zstd
                                                        is not installed

Why the layer errors are INVALID: the bytes were verified against the digest the release
pins, so the *image* is what is wrong; no retry fixes it, a rebuilt image does.
"""

from __future__ import annotations

from ember.core.errors import EmberError, Kind, NotFound, Unavailable, ValidationFailed


class ImageError(EmberError):
    code = "image.error"
    kind = Kind.INTERNAL


class LayerUnsafe(ImageError, ValidationFailed):
    code = "image.layer_unsafe"
    kind = Kind.INVALID


class LayerInvalid(ImageError, ValidationFailed):
    code = "image.layer_invalid"
    kind = Kind.INVALID


class LayerUnsupported(ImageError, ValidationFailed):
    code = "image.layer_unsupported"
    kind = Kind.INVALID


class PlatformUnavailable(ImageError, NotFound):
    code = "image.no_platform"
    kind = Kind.NOT_FOUND


class RootfsBuildFailed(ImageError):
    code = "image.rootfs_failed"
    kind = Kind.INTERNAL


class ToolMissing(ImageError, Unavailable):
    code = "image.tool_missing"
    kind = Kind.UNAVAILABLE
