"""OCI images without Docker: layouts and archives, a deterministic builder, and a client
of the distribution API that moves images by digest and verifies every byte.

- ``layout``: ``OciLayout`` (an image layout directory), ``write_archive`` /
  ``import_archive`` (OCI and ``docker save`` tars);
- ``builder``: ``build_image(layout, [dirs], ImageConfig(...))``;
- ``registry``: ``RegistryClient`` (push, pull, resolve, manifests and blobs) and
  ``copy_image``;
- ``reference``: ``parse_reference``, ``registry_url``;
- ``errors``: the ``oci.*`` error tree.
"""

from ember.client.oci.builder import ImageConfig, Layer, build_image, write_layer
from ember.client.oci.errors import (
    BlobUnknown,
    DigestMismatch,
    InvalidReference,
    LayoutInvalid,
    ManifestUnknown,
    OciError,
    RegistryDenied,
    RegistryError,
    RegistryRejected,
    RegistryUnauthorized,
    RegistryUnavailable,
    RegistryUnreachable,
    RepositoryUnknown,
)
from ember.client.oci.layout import OciLayout, import_archive, write_archive
from ember.client.oci.media import Descriptor
from ember.client.oci.reference import Reference, parse_reference, registry_url
from ember.client.oci.registry import (
    CopyResult,
    PullResult,
    PushResult,
    RegistryClient,
    copy_image,
)

__all__ = [
    "BlobUnknown",
    "CopyResult",
    "Descriptor",
    "DigestMismatch",
    "ImageConfig",
    "InvalidReference",
    "Layer",
    "LayoutInvalid",
    "ManifestUnknown",
    "OciError",
    "OciLayout",
    "PullResult",
    "PushResult",
    "Reference",
    "RegistryClient",
    "RegistryDenied",
    "RegistryError",
    "RegistryRejected",
    "RegistryUnauthorized",
    "RegistryUnavailable",
    "RegistryUnreachable",
    "RepositoryUnknown",
    "build_image",
    "copy_image",
    "import_archive",
    "parse_reference",
    "registry_url",
    "write_archive",
    "write_layer",
]
