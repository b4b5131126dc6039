"""Verify a received SigV4 signature with botocore (an independent signer).

Fake X-Ray endpoints in tests call ``verify`` on every request, so a wrong
signature from the daemon fails the test rather than passing unnoticed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from unittest import mock

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class SignatureMismatch(AssertionError):
    pass


def parse_authorization(value: str) -> dict[str, str]:
    algorithm, _, rest = value.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        raise SignatureMismatch(f"unexpected algorithm in {value!r}")
    fields = {}
    for part in rest.split(","):
        key, _, val = part.strip().partition("=")
        fields[key] = val
    return fields


def verify(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "xray",
) -> dict[str, str]:
    """Raise SignatureMismatch unless ``headers['authorization']`` is right.

    ``headers`` must have lower-case names.  Returns the parsed Authorization.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization")
    if not auth:
        raise SignatureMismatch("request is not signed (no Authorization header)")
    fields = parse_authorization(auth)
    credential = fields["Credential"].split("/")
    if credential[0] != access_key:
        raise SignatureMismatch(
            f"signed with access key {credential[0]!r}, expected {access_key!r}"
        )
    if credential[2:] != [region, service, "aws4_request"]:
        raise SignatureMismatch(f"credential scope {credential[1:]} is not {region}/{service}")
    signed = fields["SignedHeaders"].split(";")
    for required in ("host", "x-amz-date"):
        if required not in signed:
            raise SignatureMismatch(f"{required} is not signed: {signed}")
    amz_date = lower["x-amz-date"]
    when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc
    )
    request = AWSRequest(
        method=method, url=url, data=body, headers={name: lower[name] for name in signed}
    )
    token = lower.get("x-amz-security-token") if "x-amz-security-token" in signed else None
    creds = Credentials(access_key, secret_key, token)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(creds, service, region).add_auth(request)
    expected = parse_authorization(request.headers["Authorization"])
    if expected["SignedHeaders"] != fields["SignedHeaders"]:
        raise SignatureMismatch(
            f"botocore signs {expected['SignedHeaders']}, request says {fields['SignedHeaders']}"
        )
    if expected["Signature"] != fields["Signature"]:
        raise SignatureMismatch(
            f"signature mismatch: got {fields['Signature']}, expected {expected['Signature']}"
        )
    return fields
