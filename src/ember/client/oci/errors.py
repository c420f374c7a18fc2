"""Errors of the OCI code (image layouts, the builder, the registry client).

Every class subclasses the ember.core class of its kind, so callers catch by kind and the
CLI derives its exit code from ``kind``; the ``code`` is the stable contract::

    OciError                     oci.error             (kind INTERNAL)
    ├── DigestMismatch           oci.digest_mismatch   (kind INTERNAL) content ≠ its digest
    ├── InvalidReference         oci.invalid_reference (ValidationFailed) bad name/tag/digest
    ├── LayoutInvalid            oci.layout_invalid    (ValidationFailed) not a usable layout
    │                                                  or archive, or an unsupported manifest
    ├── RegistryRejected         oci.rejected          (ValidationFailed) 4xx the registry
    │                                                  refused (detail.registry_code)
    ├── BlobUnknown              oci.blob_unknown      (NotFound)
    ├── ManifestUnknown          oci.manifest_unknown  (NotFound)
    ├── RepositoryUnknown        oci.name_unknown      (NotFound)
    ├── RegistryUnauthorized     oci.unauthorized      (Unauthorized)
    ├── RegistryDenied           oci.denied            (Forbidden)
    ├── RegistryUnavailable      oci.unavailable       (Unavailable) 429, 502, 503, 504
    ├── RegistryUnreachable      oci.unreachable       (Unavailable) no answer at all
    └── RegistryError            oci.registry_error    (kind INTERNAL) other answers

Why ``DigestMismatch`` is INTERNAL and not INVALID: content that does not hash to the
digest it was asked for (a registry serving a corrupt or tampered blob or manifest, or a
local layout whose blob file was altered) is an integrity failure. No change to the
command line fixes it and retrying returns the same bytes, so it exits 1 ("read the
message; report it"), never 2 ("fix the command"). Nothing unverified is ever kept: the
partial download is deleted before the error is raised. ``detail`` carries ``digest``
(expected), ``actual`` (what the bytes hash to, when all were read), ``size`` /
``actual_size`` and ``source`` (a URL or path).
"""

from __future__ import annotations

from ember.core.errors import EmberError, Kind, NotFound, Unavailable, ValidationFailed
from ember.core.tenancy import Forbidden, Unauthorized


class OciError(EmberError):
    code = "oci.error"
    kind = Kind.INTERNAL


class DigestMismatch(OciError):
    code = "oci.digest_mismatch"
    kind = Kind.INTERNAL


class InvalidReference(OciError, ValidationFailed):
    code = "oci.invalid_reference"
    kind = Kind.INVALID


class LayoutInvalid(OciError, ValidationFailed):
    code = "oci.layout_invalid"
    kind = Kind.INVALID


class RegistryRejected(OciError, ValidationFailed):
    code = "oci.rejected"
    kind = Kind.INVALID


class BlobUnknown(OciError, NotFound):
    code = "oci.blob_unknown"
    kind = Kind.NOT_FOUND


class ManifestUnknown(OciError, NotFound):
    code = "oci.manifest_unknown"
    kind = Kind.NOT_FOUND


class RepositoryUnknown(OciError, NotFound):
    code = "oci.name_unknown"
    kind = Kind.NOT_FOUND


class RegistryUnauthorized(OciError, Unauthorized):
    code = "oci.unauthorized"
    kind = Kind.UNAUTHORIZED


class RegistryDenied(OciError, Forbidden):
    code = "oci.denied"
    kind = Kind.FORBIDDEN


class RegistryUnavailable(OciError, Unavailable):
    code = "oci.unavailable"
    kind = Kind.UNAVAILABLE


class RegistryUnreachable(OciError, Unavailable):
    code = "oci.unreachable"
    kind = Kind.UNAVAILABLE


class RegistryError(OciError):
    code = "oci.registry_error"
    kind = Kind.INTERNAL
