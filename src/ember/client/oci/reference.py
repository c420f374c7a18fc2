"""Image references (``[registry/]repository[:tag][@digest]``) and registry URLs. Pure.

The grammar is distribution's ``reference`` grammar, restricted to what Ember needs: the
first path component is a registry when it contains ``.`` or ``:`` or is ``localhost``;
repository components are lowercase ``[a-z0-9]+`` joined by ``.``, ``_``, ``__`` or
``-``; tags are ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; digests are sha256.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from ember.client.oci.errors import InvalidReference
from ember.client.oci.media import check_digest

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


@dataclasses.dataclass(frozen=True)
class Reference:
    registry: str | None
    """``host[:port]``, or None when the reference names no registry."""
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def by_digest(self, digest: str) -> Reference:
        return dataclasses.replace(self, tag=None, digest=check_digest(digest))


def check_repository(name: str) -> str:
    parts = name.split("/")
    if not name or len(name) > 255 or not all(_COMPONENT.match(p) for p in parts):
        raise InvalidReference(
            f"invalid repository name {name!r}",
            hint="use lowercase letters, digits and . _ - separated by /, like 'org/app'",
            detail={"field": "repository"},
        )
    return name


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}",
            hint="a tag is up to 128 letters, digits, '_', '.' or '-', not starting with . or -",
            detail={"field": "tag"},
        )
    return tag


def check_registry(registry: str) -> str:
    """``host[:port]`` (IPv6 in brackets), or InvalidReference."""
    if not _HOST.match(registry):
        raise InvalidReference(
            f"invalid registry {registry!r}: give host[:port], like 127.0.0.1:5050",
            detail={"field": "registry"},
        )
    return registry


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]repository[:tag][@digest]``; InvalidReference names what is wrong."""
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        check_digest(digest)
    registry = None
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, rest = check_registry(first), remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], check_tag(rest[colon + 1 :])
    return Reference(registry, check_repository(rest), tag, digest)


def is_loopback(host: str) -> bool:
    """Is ``host`` (no port; IPv6 may be bracketed) this machine's loopback?"""
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def split_host_port(registry: str) -> tuple[str, int | None]:
    if registry.startswith("["):
        host, _, tail = registry[1:].partition("]")
        return host, int(tail[1:]) if tail.startswith(":") else None
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return registry, None


def registry_url(registry: str) -> str:
    """The base URL for ``host[:port]``: plain http on loopback, https everywhere else.

    Plain http is never used for another host: image content is verified by digest, but
    credentials and tags are not, so they only travel over TLS off this machine."""
    host, _ = split_host_port(check_registry(registry))
    scheme = "http" if is_loopback(host) else "https"
    return f"{scheme}://{registry}"
