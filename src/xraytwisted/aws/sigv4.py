"""AWS Signature Version 4 (header-based, non-S3) request signing.

Written from the SigV4 specification. Pure functions over plain values: no I/O, no clock
(the caller passes ``when``), standard library only.

Path and query semantics:

- ``path`` is the request path exactly as it goes on the wire. It is normalised (dot segments
  and empty segments removed) and then every byte outside the unreserved set is
  percent-encoded, *including* ``%``. An already-encoded wire path is therefore encoded a
  second time, which is what non-S3 services expect ("URI-encode each segment twice").
- ``query`` is the raw query string without the leading ``?``. Each key and value is
  percent-decoded and re-encoded canonically. ``+`` is a literal plus (RFC 3986), not a
  space, so callers should send spaces as ``%20``.
"""

import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote_from_bytes, unquote_to_bytes

__all__ = [
    "ALGORITHM",
    "UNSIGNED_HEADERS",
    "Credentials",
    "SigningResult",
    "amz_date",
    "canonical_headers",
    "canonical_query",
    "canonical_request",
    "canonical_uri",
    "credential_scope",
    "payload_hash",
    "sign",
    "sign_detailed",
    "signing_key",
    "string_to_sign",
]

ALGORITHM = "AWS4-HMAC-SHA256"

# Hop-by-hop headers, or headers that proxies and SDK layers add or rewrite after signing;
# signing them would make the signature fragile.
UNSIGNED_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
        # W3C trace context: service meshes add and rewrite these in flight.
        "baggage",
        "traceparent",
        "tracestate",
    }
)

_SCOPE_TERMINATOR = "aws4_request"
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_MASK = "***"

# Headers sign() supplies itself; caller copies are dropped so the returned values win.
_SIGNER_OWNED_HEADERS = frozenset({"authorization", "x-amz-date", "x-amz-security-token"})

# Only HTTP (ASCII) whitespace is collapsed: non-ASCII spaces are header data, not syntax.
_WHITESPACE_RUN = re.compile(r"[ \t\r\n\v\f]+")


@dataclass(frozen=True, repr=False)
class Credentials:
    """AWS credentials; ``expiry`` is epoch seconds, ``None`` for non-expiring keys."""

    access_key: str
    secret_key: str
    token: str | None = None
    expiry: float | None = None

    def __repr__(self) -> str:
        # Credentials end up in log lines and tracebacks: never show the secrets.
        token = None if self.token is None else _MASK
        return (
            f"Credentials(access_key={self.access_key!r}, secret_key={_MASK!r}, "
            f"token={token!r}, expiry={self.expiry!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class SigningResult:
    """Everything computed while signing; ``headers`` is what :func:`sign` returns."""

    canonical_request: str
    string_to_sign: str
    signature: str
    authorization: str
    headers: tuple[tuple[str, str], ...]


def amz_date(when: datetime) -> str:
    """Format a timezone-aware datetime as ``YYYYMMDDTHHMMSSZ`` in UTC."""
    if when.tzinfo is None or when.utcoffset() is None:
        # A naive datetime is ambiguous; guessing local time would sign with a skewed clock.
        raise ValueError(f"when must be timezone-aware, got {when!r}")
    return when.astimezone(timezone.utc).strftime(_AMZ_DATE_FORMAT)


def payload_hash(body: bytes) -> str:
    """Lower-case hex SHA-256 of the exact body bytes."""
    return hashlib.sha256(body).hexdigest()


def _encode(raw: bytes) -> str:
    # quote_from_bytes always keeps A-Z a-z 0-9 - _ . ~ (the RFC 3986 unreserved set) and
    # emits upper-case hex; safe="" makes it encode everything else, "/" included.
    return quote_from_bytes(raw, safe="")


# A path that is already canonical: unreserved characters only, no empty,
# "." or ".." segments.  Every X-Ray API path is one; checking is much
# cheaper than normalising (this runs for every upload).
_CANONICAL_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~]+)*/?")


def canonical_uri(path: str) -> str:
    """Normalise and percent-encode a request path (non-S3 rules)."""
    if path.startswith("/") and _CANONICAL_PATH.fullmatch(path):
        return path
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            # Empty segments come from repeated slashes, which AWS collapses.
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    if not segments:
        return "/"
    trailing = "/" if path.endswith("/") else ""
    # surrogateescape lets a caller carry undecodable wire bytes through a str path.
    encoded = (_encode(s.encode("utf-8", "surrogateescape")) for s in segments)
    return "/" + "/".join(encoded) + trailing


def canonical_query(query: str) -> str:
    """Canonical query string: pairs decoded, re-encoded, sorted; repeated keys kept."""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        # Decode to bytes, not str, so escapes of non-UTF-8 bytes survive unchanged.
        pairs.append((_encode(unquote_to_bytes(key)), _encode(unquote_to_bytes(value))))
    pairs.sort()
    return "&".join(f"{key}={value}" for key, value in pairs)


def _trim_all(value: str) -> str:
    return _WHITESPACE_RUN.sub(" ", value).strip(" ")


def canonical_headers(headers: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Return ``(canonical header block, signed-headers string)``.

    Every line of the block, the last included, ends with ``"\\n"``. Headers in
    :data:`UNSIGNED_HEADERS` are left out; repeated headers are joined with ``,`` in order.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        lname = name.strip().lower()
        if not lname:
            raise ValueError(f"empty header name (value {value!r})")
        if lname in UNSIGNED_HEADERS:
            continue
        merged.setdefault(lname, []).append(_trim_all(value))
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def _assemble_canonical_request(
    method: str, path: str, query: str, header_block: str, signed_headers: str, body_hash: str
) -> str:
    # The header block already ends with "\n", which yields the blank line the spec requires.
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            header_block,
            signed_headers,
            body_hash,
        )
    )


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body_hash: str,
) -> str:
    """Build the canonical request (all of ``headers`` outside UNSIGNED_HEADERS are signed)."""
    block, signed = canonical_headers(headers)
    return _assemble_canonical_request(method, path, query, block, signed, body_hash)


def credential_scope(datestamp: str, region: str, service: str) -> str:
    """``YYYYMMDD/region/service/aws4_request``."""
    return f"{datestamp}/{region}/{service}/{_SCOPE_TERMINATOR}"


def string_to_sign(amzdate: str, scope: str, canonical_req: str) -> str:
    """The string to sign for a canonical request."""
    digest = hashlib.sha256(canonical_req.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amzdate}\n{scope}\n{digest}"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


@functools.lru_cache(maxsize=16)
def signing_key(secret_key: str, datestamp: str, region: str, service: str) -> bytes:
    """Derive the per-day, per-region, per-service signing key.

    Memoized: it changes once a day (or with the credentials), and deriving
    it was nearly half the cost of signing a request.
    """
    k_date = _hmac(f"AWS4{secret_key}".encode(), datestamp)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, _SCOPE_TERMINATOR)


def sign_detailed(
    *,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None = None,
    body_hash: str | None = None,
    credentials: Credentials,
    region: str,
    service: str,
    when: datetime,
) -> SigningResult:
    """Like :func:`sign`, but also return the intermediate values (for tests and debugging)."""
    if body is not None and body_hash is None:
        digest = payload_hash(body)
    elif body is None and body_hash is not None:
        digest = body_hash
    else:
        raise TypeError("pass exactly one of body or body_hash")
    if not any(name.strip().lower() == "host" for name, _ in headers):
        raise ValueError("headers must include Host")

    amzdate = amz_date(when)
    added: list[tuple[str, str]] = [("X-Amz-Date", amzdate)]
    if credentials.token:
        added.append(("X-Amz-Security-Token", credentials.token))
    to_sign = [h for h in headers if h[0].strip().lower() not in _SIGNER_OWNED_HEADERS]
    to_sign.extend(added)

    block, signed = canonical_headers(to_sign)
    creq = _assemble_canonical_request(method, path, query, block, signed, digest)
    datestamp = amzdate[:8]
    scope = credential_scope(datestamp, region, service)
    sts = string_to_sign(amzdate, scope, creq)
    key = signing_key(credentials.secret_key, datestamp, region, service)
    signature = hmac.new(key, sts.encode("utf-8"), hashlib.sha256).hexdigest()
    authorization = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    added.append(("Authorization", authorization))
    return SigningResult(
        canonical_request=creq,
        string_to_sign=sts,
        signature=signature,
        authorization=authorization,
        headers=tuple(added),
    )


def sign(
    *,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None = None,
    body_hash: str | None = None,
    credentials: Credentials,
    region: str,
    service: str,
    when: datetime,
) -> list[tuple[str, str]]:
    """Return the headers to add to the request.

    ``("X-Amz-Date", ...)``, then ``("X-Amz-Security-Token", token)`` when
    ``credentials.token`` is set (the token is signed), then ``("Authorization", ...)``.
    ``headers`` are the request headers to sign and must include Host; any X-Amz-Date,
    X-Amz-Security-Token or Authorization among them is ignored, and the caller must replace
    them with the returned values. Pass exactly one of ``body`` / ``body_hash``.
    """
    result = sign_detailed(
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        body_hash=body_hash,
        credentials=credentials,
        region=region,
        service=service,
        when=when,
    )
    return list(result.headers)
