"""Registry authentication: the distribution token flow, as an ``httpx.Auth``.

A registry that wants credentials answers 401 with ``WWW-Authenticate``:

- ``Basic realm=...``: the request is retried once with the username and password.
- ``Bearer realm=R,service=S,scope=X``: a token is fetched from ``GET R?service=S&scope=X``
  (with the username and password as Basic credentials when there are any; anonymously
  otherwise, which public registries allow for pulls), then the request is retried with
  ``Authorization: Bearer <token>``. The token (``token`` or ``access_token`` in the JSON
  answer) is kept and sent pre-emptively on the following requests; when a later request
  needs a wider scope (a push after a pull), the registry challenges again and a new
  token is fetched. A token given up front (``token=``) is sent as a bearer from the start.

Not supported yet (documented so nobody relies on it): OAuth2 ``POST`` token requests with
refresh tokens, Docker credential helpers and ``~/.docker/config.json``, and refreshing a
token that expires in the middle of one upload (the upload then fails with
``oci.unauthorized`` and a retry of the push succeeds: finished blobs are skipped).
Basic is tested against a real docker-registry with htpasswd (tests/e2e/test_registry.py);
the Bearer flow follows the distribution token spec but has no real token server to be
tested against here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Generator

import httpx

from ember.client.oci.reference import is_loopback

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """``("bearer", {"realm": ..., ...})`` from a WWW-Authenticate value, or None."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), {k: v.replace('\\"', '"') for k, v in params.items()}


class RegistryAuth(httpx.Auth):
    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
    ) -> None:
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            if username
            else None
        )
        self._bearer = token
        self._send_basic = False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:  # noqa: PLR0911 - one return per challenge outcome
        if self._bearer:
            request.headers["Authorization"] = f"Bearer {self._bearer}"
        elif self._send_basic and self._basic:
            request.headers["Authorization"] = self._basic
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        if challenge is None:
            return
        scheme, params = challenge
        if scheme == "basic":
            if not self._basic or self._send_basic:
                return  # no credentials, or they were refused already
            self._send_basic = True
            request.headers["Authorization"] = self._basic
            yield request
        elif scheme == "bearer" and params.get("realm"):
            realm = httpx.URL(params["realm"])
            if realm.scheme != "https" and not is_loopback(realm.host):
                return  # never send credentials to a plain-http token service elsewhere
            query = {k: params[k] for k in ("service", "scope") if params.get(k)}
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self._basic:
                token_request.headers["Authorization"] = self._basic
            token_response = yield token_request
            token_response.read()
            if token_response.status_code != 200:
                return
            try:
                body = token_response.json()
            except ValueError:
                return
            token = (
                body.get("token") or body.get("access_token") if isinstance(body, dict) else None
            )
            if not token:
                return
            self._bearer = str(token)
            request.headers["Authorization"] = f"Bearer {self._bearer}"
            yield request
