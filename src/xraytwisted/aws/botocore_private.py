"""The one place xraytwisted reads a private botocore name: when credentials expire.

Why private: the daemon looks credentials up again on its own schedule,
before they expire (``aws/credentials.py``), so it needs their expiry.
botocore's ``RefreshableCredentials`` (container endpoint, IMDS, SSO, web
identity, profile roles, ``credential_process``) keep it only in
``_expiry_time``.  The public API has ``refresh_needed(refresh_in)``, a
yes/no for one lead time, and frozen credentials, which carry no expiry.
Without the expiry the daemon still works: credentials whose expiry is
unknown are looked up again every 5 minutes.

``tests/aws/test_botocore_private.py`` fails, naming the attribute, when a
botocore upgrade changes it.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["expiry_of"]


def expiry_of(credentials: object) -> float | None:
    """When botocore ``credentials`` expire (Unix time), or None if botocore does not say.

    Read after ``get_frozen_credentials()``: credentials that are fetched on
    first use learn their expiry then.
    """
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry.timestamp() if isinstance(expiry, datetime) else None
