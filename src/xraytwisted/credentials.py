"""AWS credentials for signing.

Signers ask ``current()`` and get credentials usable right now (or None);
they never wait for a lookup.  For now credentials come from the standard
environment variables only.
"""

from __future__ import annotations

from collections.abc import Mapping

from xraytwisted.sigv4 import Credentials


def from_environment(env: Mapping[str, str]) -> Credentials | None:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, if set."""
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        return None
    return Credentials(access_key, secret_key, env.get("AWS_SESSION_TOKEN") or None)


class StaticCredentials:
    """Credentials that never change."""

    def __init__(self, credentials: Credentials | None) -> None:
        self._credentials = credentials

    def current(self) -> Credentials | None:
        return self._credentials
