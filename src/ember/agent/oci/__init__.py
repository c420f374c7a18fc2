"""Images on a host: pull by digest, unpack, build an ext4 root filesystem, cache, collect.

- ``store``: ``ImageStore(root, registry, budget_bytes)`` with ``prepare(repository,
  digest) -> PreparedImage`` (root filesystem path, runtime config, timings) and
  ``gc(in_use)``;
- ``unpack``: ``Unpacker`` / ``apply_layer``: OCI layers onto a directory, guarded;
- ``rootfs``: ``build_ext4`` (``mkfs.ext4 -d``, no mounts) and the platform's mount points;
- ``errors``: the ``image.*`` error tree (integrity errors are ``oci.digest_mismatch``).

The registry is ``ember.client.oci.RegistryClient``; docs/specs/images.md ("How the agent
prepares an image") is the contract.
"""

from ember.agent.oci.errors import (
    ImageError,
    LayerInvalid,
    LayerUnsafe,
    LayerUnsupported,
    PlatformUnavailable,
    RootfsBuildFailed,
    ToolMissing,
)
from ember.agent.oci.rootfs import MOUNT_POINTS, build_ext4, ensure_mount_points
from ember.agent.oci.store import (
    GcResult,
    ImageStore,
    PreparedImage,
    Registry,
    RuntimeConfig,
    Timings,
)
from ember.agent.oci.unpack import (
    LAYER_MEDIA_TYPES,
    OCI_LAYER_ZSTD,
    Unpacker,
    UnpackStats,
    apply_layer,
)

__all__ = [
    "LAYER_MEDIA_TYPES",
    "MOUNT_POINTS",
    "OCI_LAYER_ZSTD",
    "GcResult",
    "ImageError",
    "ImageStore",
    "LayerInvalid",
    "LayerUnsafe",
    "LayerUnsupported",
    "PlatformUnavailable",
    "PreparedImage",
    "Registry",
    "RootfsBuildFailed",
    "RuntimeConfig",
    "Timings",
    "ToolMissing",
    "UnpackStats",
    "Unpacker",
    "apply_layer",
    "build_ext4",
    "ensure_mount_points",
]
