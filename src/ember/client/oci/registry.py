"""A client of the OCI distribution API (``/v2/``): push, pull and copy images by digest.

Everything is addressed by digest and verified:

- ``pull`` fetches the manifest by digest and checks its sha256 and size before parsing
  it, then streams every blob into an OCI layout while hashing it; a blob or manifest
  whose bytes do not match raises ``DigestMismatch`` (``oci.digest_mismatch``, kind
  INTERNAL: see ember.client.oci.errors) and nothing of it is kept. Blobs the layout has
  already are not fetched again (the layout is the layer cache).
- ``push`` asks the registry (``HEAD``) for each blob and manifest first and uploads only
  what is missing, blob by blob as a monolithic upload (``POST`` a session, ``PUT`` the
  bytes with ``?digest=``), optionally mounting from another repository of the same
  registry; manifests go up by digest with their own media type (and also under a tag if
  one is given). Pushing the same image twice sends nothing but ``HEAD`` requests.
- ``copy_image`` moves an image between registries by digest, streaming each missing
  blob from one to the other (verified on the way; mounted instead on the same registry).

Registry answers become ember errors with stable ``oci.*`` codes (errors.py); httpx
exceptions never escape. Plain http is used only for loopback registries; everything else
is https (see reference.registry_url). Authentication: auth.RegistryAuth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import httpx

from ember import __version__
from ember.client.oci.auth import RegistryAuth
from ember.client.oci.errors import (
    BlobUnknown,
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
from ember.client.oci.layout import CHUNK, OciLayout
from ember.client.oci.media import (
    ACCEPT_MANIFESTS,
    INDEXES,
    MANIFESTS,
    MAX_MANIFEST_BYTES,
    Descriptor,
    check_digest,
    children,
    mismatch,
    parse_manifest,
    platform_matches,
    sha256_digest,
)
from ember.client.oci.reference import (
    Reference,
    check_registry,
    check_repository,
    check_tag,
    is_loopback,
    parse_reference,
    registry_url,
)

USER_AGENT = f"ember/{__version__}"
UNREACHABLE_HINT = "is the registry running? 'ember dev up' starts one on 127.0.0.1:5050"

_BY_REGISTRY_CODE: dict[str, type[OciError]] = {
    "BLOB_UNKNOWN": BlobUnknown,
    "MANIFEST_UNKNOWN": ManifestUnknown,
    "NAME_UNKNOWN": RepositoryUnknown,
    "UNAUTHORIZED": RegistryUnauthorized,
    "DENIED": RegistryDenied,
    "TOOMANYREQUESTS": RegistryUnavailable,
    "UNAVAILABLE": RegistryUnavailable,
}


@dataclasses.dataclass(frozen=True)
class PushResult:
    descriptor: Descriptor
    """The pushed image's manifest (or index)."""
    uploaded: tuple[str, ...]
    """Digests of the blobs and manifests sent now."""
    existing: tuple[str, ...]
    """Digests the registry had already (nothing sent)."""
    mounted: tuple[str, ...] = ()
    """Blobs the registry linked from another repository instead of an upload."""

    @property
    def digest(self) -> str:
        return self.descriptor.digest


@dataclasses.dataclass(frozen=True)
class PullResult:
    descriptor: Descriptor
    fetched: tuple[str, ...]
    """Digests downloaded (and verified) now."""
    cached: tuple[str, ...]
    """Blobs the layout had already."""

    @property
    def digest(self) -> str:
        return self.descriptor.digest


class _Reopening:
    """A request body that can be sent more than once (an auth retry re-iterates it)."""

    def __init__(self, open_chunks: Callable[[], Iterable[bytes]]) -> None:
        self._open = open_chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._open())


class RegistryClient:
    """One registry (``host[:port]``, or an explicit ``http(s)://`` base URL).

    Use as a context manager (or ``close()``). ``transport`` is httpx's, for tests that
    count requests; ``insecure`` allows an explicit ``http://`` URL to a host that is not
    loopback (never needed for the embedded registry)."""

    def __init__(
        self,
        registry: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        insecure: bool = False,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        if "://" in registry:
            url = httpx.URL(registry)
            if url.scheme not in ("http", "https") or not url.host:
                raise InvalidReference(
                    f"invalid registry URL {registry!r}", detail={"field": "registry"}
                )
            if url.scheme == "http" and not insecure and not is_loopback(url.host):
                raise InvalidReference(
                    f"refusing plain http to {url.host}: only loopback registries may use http",
                    hint="use https://, or give the registry as host:port",
                    detail={"field": "registry"},
                )
            self.registry = url.netloc.decode()
            self.base_url = str(url.copy_with(path="/", query=None)).rstrip("/")
        else:
            check_registry(registry)
            self.registry = registry
            self.base_url = registry_url(registry)
        self._http = httpx.Client(
            base_url=self.base_url,
            # Identity only: a digest is over the stored bytes, so no transfer encoding may
            # stand between them and the hash.
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
            follow_redirects=True,  # blob GETs may redirect to storage (S3, a CDN)
            auth=RegistryAuth(username, password, token),
        )

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url!r})"

    # -- plumbing ----------------------------------------------------------------------

    def _send(
        self, method: str, url: str, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        try:
            request = self._http.build_request(method, url, **kwargs)
            return self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(
                f"no answer from the registry at {self.base_url}: {exc}",
                hint=UNREACHABLE_HINT,
                detail={"registry": self.base_url},
            ) from exc

    def _error(self, response: httpx.Response, what: str) -> OciError:
        """The typed error for an error answer about ``what``."""
        code, message = _registry_error(response)
        status = response.status_code
        detail = {"registry": self.base_url, "status": status, "registry_code": code}
        text = f"registry {self.base_url} answered {status} for {what}" + (
            f": {message}" if message else ""
        )
        cls: type[OciError]
        if code in _BY_REGISTRY_CODE:
            cls = _BY_REGISTRY_CODE[code]
        elif status == 401:
            cls = RegistryUnauthorized
        elif status == 403:
            cls = RegistryDenied
        elif status == 404:
            cls = ManifestUnknown if "manifest" in what else BlobUnknown
        elif status in (429, 502, 503, 504):
            cls = RegistryUnavailable
        elif 400 <= status < 500:
            cls = RegistryRejected
        else:
            cls = RegistryError
        hint = {
            RegistryUnauthorized: "give registry credentials (username/password or a token)",
            RegistryDenied: "the credentials lack access to this repository",
            RegistryUnavailable: "retry in a moment",
        }.get(cls)
        return cls(text, hint=hint, detail=detail)

    def _blob_url(self, repo: str, digest: str) -> str:
        return f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}"

    def _manifest_url(self, repo: str, reference: str) -> str:
        if ":" in reference:
            check_digest(reference)
        else:
            check_tag(reference)
        return f"/v2/{check_repository(repo)}/manifests/{reference}"

    # -- the API -----------------------------------------------------------------------

    def ping(self) -> None:
        """Is this a distribution API that lets us in? (``GET /v2/`` is 200.)"""
        response = self._send("GET", "/v2/")
        if response.status_code != 200:
            raise self._error(response, "/v2/")

    def has_blob(self, repo: str, desc: Descriptor) -> bool:
        response = self._send("HEAD", self._blob_url(repo, desc.digest))
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._error(response, f"blob {desc.digest}")

    def push_blob(
        self,
        repo: str,
        desc: Descriptor,
        chunks: Callable[[], Iterable[bytes]],
        *,
        mount_from: str | None = None,
        check_existing: bool = True,
    ) -> str:
        """Upload one blob unless the registry has it: ``"existing"``, ``"mounted"`` or
        ``"uploaded"``. ``chunks`` opens the content (it may be called again for an auth
        retry)."""
        if check_existing and self.has_blob(repo, desc):
            return "existing"
        params = (
            {"mount": desc.digest, "from": check_repository(mount_from)} if mount_from else None
        )
        start = self._send("POST", f"/v2/{check_repository(repo)}/blobs/uploads/", params=params)
        if start.status_code == 201 and mount_from:
            return "mounted"
        if start.status_code != 202 or "location" not in start.headers:
            raise self._error(start, f"an upload of {desc.digest}")
        location = self._http.base_url.join(start.headers["location"])
        url = location.copy_merge_params({"digest": desc.digest})
        done = self._send(
            "PUT",
            str(url),
            content=_Reopening(chunks),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
        )
        if done.status_code != 201:
            raise self._error(done, f"the upload of {desc.digest}")
        echoed = done.headers.get("docker-content-digest")
        if echoed and echoed != desc.digest:
            raise mismatch(f"registry {self.base_url}", desc.digest, desc.size, actual=echoed)
        return "uploaded"

    def fetch_blob(self, repo: str, desc: Descriptor) -> Iterator[bytes]:
        """The blob's bytes as they stream in, checked against ``desc``: the last chunk is
        held back until digest and size are verified, so a consumer never sees the whole
        of a bad blob; too many bytes fail as soon as they arrive."""
        source = f"registry {self.base_url} ({repo})"
        with contextlib.closing(
            self._send("GET", self._blob_url(repo, desc.digest), stream=True)
        ) as r:
            if r.status_code != 200:
                r.read()
                raise self._error(r, f"blob {desc.digest}")
            length = r.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != desc.size:
                raise mismatch(source, desc.digest, desc.size, actual_size=int(length))
            sha = hashlib.sha256()
            size = 0
            pending = b""
            try:
                for chunk in r.iter_bytes(CHUNK):
                    size += len(chunk)
                    if size > desc.size:
                        raise mismatch(source, desc.digest, desc.size, actual_size=size)
                    sha.update(chunk)
                    if pending:
                        yield pending
                    pending = chunk
            except httpx.TransportError as exc:
                raise RegistryUnreachable(
                    f"the registry at {self.base_url} dropped blob {desc.digest}: {exc}",
                    hint="retry; blobs already fetched are kept",
                    detail={"registry": self.base_url},
                ) from exc
            actual = "sha256:" + sha.hexdigest()
            if actual != desc.digest or size != desc.size:
                raise mismatch(source, desc.digest, desc.size, actual=actual, actual_size=size)
            if pending:
                yield pending

    def get_manifest(
        self, repo: str, reference: str, expected: Descriptor | None = None
    ) -> tuple[Descriptor, bytes]:
        """A manifest or index by digest or tag, verified: by digest, its bytes must hash
        to it (and have ``expected.size``, when given); by tag, the digest is computed
        from the bytes and must equal the registry's Docker-Content-Digest if it sent one."""
        source = f"registry {self.base_url} ({repo})"
        with contextlib.closing(
            self._send(
                "GET",
                self._manifest_url(repo, reference),
                headers={"Accept": ACCEPT_MANIFESTS},
                stream=True,
            )
        ) as r:
            if r.status_code != 200:
                r.read()
                raise self._error(r, f"manifest {reference}")
            data = b""
            for chunk in r.iter_bytes(CHUNK):
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise RegistryRejected(
                        f"{source}: manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes",
                        detail={"registry": self.base_url},
                    )
            media_type = r.headers.get("content-type", "").split(";")[0].strip()
            echoed = r.headers.get("docker-content-digest")
        actual = sha256_digest(data)
        want = reference if reference.startswith("sha256:") else echoed
        size = expected.size if expected is not None else None
        if (want and actual != want) or (size is not None and size != len(data)):
            raise mismatch(source, want or actual, size, actual=actual, actual_size=len(data))
        doc = parse_manifest(data, media_type or None, f"{source} {reference}")
        return Descriptor(doc["mediaType"], actual, len(data)), data

    def has_manifest(self, repo: str, reference: str) -> str | None:
        """The digest the registry has under ``reference`` (HEAD), or None."""
        response = self._send(
            "HEAD", self._manifest_url(repo, reference), headers={"Accept": ACCEPT_MANIFESTS}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._error(response, f"manifest {reference}")
        return response.headers.get("docker-content-digest") or (
            reference if reference.startswith("sha256:") else None
        )

    def put_manifest(
        self, repo: str, data: bytes, media_type: str, reference: str | None = None
    ) -> Descriptor:
        """Store a manifest under its digest (default) or a tag; return its descriptor."""
        if media_type not in MANIFESTS:
            raise LayoutInvalid(f"not a manifest media type: {media_type!r}")
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        response = self._send(
            "PUT",
            self._manifest_url(repo, reference or desc.digest),
            content=data,
            headers={"Content-Type": media_type},
        )
        if response.status_code != 201:
            raise self._error(response, f"manifest {desc.digest}")
        echoed = response.headers.get("docker-content-digest")
        if echoed and echoed != desc.digest:
            raise mismatch(f"registry {self.base_url}", desc.digest, desc.size, actual=echoed)
        return desc

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest by digest (the registry must allow deletes); False if absent."""
        response = self._send("DELETE", self._manifest_url(repo, check_digest(digest)))
        if response.status_code == 404:
            return False
        if response.status_code != 202:
            raise self._error(response, f"manifest {digest}")
        return True

    def list_tags(self, repo: str) -> list[str]:
        response = self._send("GET", f"/v2/{check_repository(repo)}/tags/list")
        if response.status_code != 200:
            raise self._error(response, f"the tags of {repo}")
        tags = response.json().get("tags") or []
        return sorted(str(t) for t in tags)

    def resolve(self, ref: str | Reference) -> str:
        """The digest ``ref`` (``[registry/]repo:tag`` or ``...@sha256:...``) names now.

        A reference with a digest is checked to exist and to match; one with a tag is
        resolved from the manifest's bytes (not just a header)."""
        parsed = parse_reference(ref) if isinstance(ref, str) else ref
        if parsed.registry and parsed.registry != self.registry:
            raise InvalidReference(
                f"{parsed} names registry {parsed.registry}, not {self.registry}",
                detail={"field": "registry"},
            )
        desc, _ = self.get_manifest(parsed.repository, parsed.reference)
        return desc.digest

    # -- whole images ------------------------------------------------------------------

    def push(
        self,
        layout: OciLayout,
        repo: str,
        image: Descriptor | None = None,
        *,
        tag: str | None = None,
        mount_from: str | None = None,
    ) -> PushResult:
        """Push an image (default: the only one listed) from ``layout`` to ``repo``: every
        blob the registry lacks, then the manifests, children first, each by digest; then
        ``tag`` if given. Blobs are re-verified as they are read from the layout."""
        root = image or layout.resolve()
        uploaded: list[str] = []
        existing: list[str] = []
        mounted: list[str] = []
        outcome = {"uploaded": uploaded, "existing": existing, "mounted": mounted}
        for item, doc in layout.walk(root):
            if doc is None:

                def chunks(item: Descriptor = item) -> Iterable[bytes]:
                    return layout.iter_blob(item)

                result = self.push_blob(repo, item, chunks, mount_from=mount_from)
                outcome[result].append(item.digest)
            elif self.has_manifest(repo, item.digest):
                existing.append(item.digest)
            else:
                data = layout.read_blob(item, limit=MAX_MANIFEST_BYTES)
                self.put_manifest(repo, data, doc["mediaType"])
                uploaded.append(item.digest)
        if tag is not None and self.has_manifest(repo, check_tag(tag)) != root.digest:
            data = layout.read_blob(root, limit=MAX_MANIFEST_BYTES)
            self.put_manifest(repo, data, root.media_type, tag)
        return PushResult(
            Descriptor(root.media_type, root.digest, root.size),
            tuple(uploaded),
            tuple(existing),
            tuple(mounted),
        )

    def pull(
        self,
        repo: str,
        digest: str,
        layout: OciLayout,
        *,
        ref_name: str | None = None,
        platform: str | None = None,
    ) -> PullResult:
        """Fetch the image ``digest`` from ``repo`` into ``layout`` (list it as
        ``ref_name``), verifying every manifest and blob. With ``platform``
        (``"linux/amd64"``) and an index, only the matching image is fetched, and it is
        what gets listed and returned."""
        run = _Pull(self, repo, layout, platform)
        root = run.manifest(check_digest(digest), None)
        if platform is not None and root.media_type in INDEXES:
            doc = layout.manifest(root)
            matches = [m for m in children(doc, digest)[1] if platform_matches(m, platform)]
            if not matches:
                raise ManifestUnknown(
                    f"image {digest} has no manifest for platform {platform}",
                    detail={"digest": digest, "platform": platform},
                )
            root = run.manifest(matches[0].digest, matches[0])
        run.tree(root)
        entry = layout.add_manifest(root, ref_name)
        return PullResult(entry, tuple(run.fetched), tuple(run.cached))


@dataclasses.dataclass
class _Pull:
    client: RegistryClient
    repo: str
    layout: OciLayout
    platform: str | None
    fetched: list[str] = dataclasses.field(default_factory=list)
    cached: list[str] = dataclasses.field(default_factory=list)

    def manifest(self, digest: str, expected: Descriptor | None) -> Descriptor:
        if expected is not None and self.layout.has_blob(expected):
            self.cached.append(digest)
            return expected
        desc, data = self.client.get_manifest(self.repo, digest, expected)
        with self.layout.writer() as w:
            w.write(data)
            stored = w.commit(desc.media_type, expected=desc)
        self.fetched.append(digest)
        return stored

    def tree(self, desc: Descriptor) -> None:
        blobs, manifests = children(self.layout.manifest(desc), desc.digest)
        for child in manifests:
            if platform_matches(child, self.platform):
                self.tree(self.manifest(child.digest, child))
        source = f"registry {self.client.base_url} ({self.repo})"
        for blob in blobs:
            if self.layout.has_blob(blob):
                self.cached.append(blob.digest)
                continue
            self.layout.ingest(blob, self.client.fetch_blob(self.repo, blob), source)
            self.fetched.append(blob.digest)


def _registry_error(response: httpx.Response) -> tuple[str | None, str | None]:
    """``(code, message)`` of the first entry of a distribution error body, if any."""
    try:
        body = json.loads(response.content) if response.content else None
    except (ValueError, httpx.ResponseNotRead):
        return None, None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None, None
    first = errors[0]
    code = first.get("code")
    message = first.get("message")
    return (
        str(code) if code else None,
        str(message)[:300] if message else None,
    )


@dataclasses.dataclass(frozen=True)
class CopyResult:
    descriptor: Descriptor
    copied: tuple[str, ...]
    """Digests sent to the destination now."""
    existing: tuple[str, ...]
    """Digests the destination had already."""
    mounted: tuple[str, ...] = ()
    """Blobs linked from the source repository (same registry) instead of copied."""

    @property
    def digest(self) -> str:
        return self.descriptor.digest


def copy_image(
    src: RegistryClient,
    src_repo: str,
    digest: str,
    dst: RegistryClient,
    dst_repo: str,
    *,
    tag: str | None = None,
) -> CopyResult:
    """Copy the image ``digest`` (an image manifest or a whole index) from one registry to
    another, by digest: every manifest and blob is verified on the way (a bad one raises
    DigestMismatch and is not pushed). Blobs the destination has are skipped; on the same
    registry, blobs are mounted across repositories instead of copied."""
    same = src.base_url == dst.base_url
    copied: list[str] = []
    existing: list[str] = []
    mounted: list[str] = []

    def copy_tree(digest: str, expected: Descriptor | None) -> Descriptor:
        desc, data = src.get_manifest(src_repo, digest, expected)
        doc = parse_manifest(data, desc.media_type, digest)
        blobs, manifests = children(doc, digest)
        for child in manifests:
            copy_tree(child.digest, child)
        for blob in blobs:
            if dst.has_blob(dst_repo, blob):
                existing.append(blob.digest)
                continue

            # Streamed straight through: fetch_blob holds its last chunk back until the
            # digest is verified, so a bad blob aborts the upload before it is complete
            # (and the registry checks the digest of what it got, too).
            def chunks(blob: Descriptor = blob) -> Iterable[bytes]:
                return src.fetch_blob(src_repo, blob)

            mount = src_repo if same and src_repo != dst_repo else None
            outcome = dst.push_blob(dst_repo, blob, chunks, mount_from=mount, check_existing=False)
            (mounted if outcome == "mounted" else copied).append(blob.digest)
        if dst.has_manifest(dst_repo, digest):
            existing.append(digest)
        else:
            dst.put_manifest(dst_repo, data, desc.media_type)
            copied.append(digest)
        return desc

    root = copy_tree(check_digest(digest), None)
    if tag is not None and dst.has_manifest(dst_repo, check_tag(tag)) != root.digest:
        _, data = src.get_manifest(src_repo, root.digest, root)
        dst.put_manifest(dst_repo, data, root.media_type, tag)
    return CopyResult(root, tuple(copied), tuple(existing), tuple(mounted))


def describe(result: PushResult | PullResult | CopyResult) -> dict[str, Any]:
    """A JSON-able summary (for ``--json`` output)."""
    out: dict[str, Any] = {"digest": result.digest, "media_type": result.descriptor.media_type}
    for field in dataclasses.fields(result):
        if field.name != "descriptor":
            out[field.name] = list(getattr(result, field.name))
    return out


__all__ = [
    "CopyResult",
    "PullResult",
    "PushResult",
    "RegistryClient",
    "copy_image",
    "describe",
]
