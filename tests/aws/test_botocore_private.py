"""The private botocore name behind xraytwisted.aws.botocore_private: still there, still current.

A failure names the attribute that changed.  Without it the daemon would
still run, but would look credentials up every 5 minutes instead of shortly
before they expire; the schedule itself is tested in test_credentials.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from botocore.credentials import DeferredRefreshableCredentials, RefreshableCredentials
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.aws.botocore_private import expiry_of

ADAPTER = "xraytwisted.aws.botocore_private.expiry_of"


def metadata(expiry: datetime) -> dict[str, str]:
    return {
        "access_key": "ASIAEXAMPLE",
        "secret_key": "secret",
        "token": "token",
        "expiry_time": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class ExpiryTests(SynchronousTestCase):
    def assert_expiry(self, credentials: object, expected: datetime) -> None:
        self.assertTrue(
            hasattr(credentials, "_expiry_time"),
            f"botocore's RefreshableCredentials._expiry_time is gone; adapt {ADAPTER}",
        )
        self.assertEqual(
            expiry_of(credentials),
            expected.timestamp(),
            f"botocore's RefreshableCredentials._expiry_time no longer holds the expiry "
            f"as a datetime; adapt {ADAPTER}",
        )

    def test_refreshable_credentials(self) -> None:
        expiry = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=6)
        credentials = RefreshableCredentials.create_from_metadata(
            metadata(expiry), refresh_using=lambda: metadata(expiry), method="container-role"
        )
        self.assert_expiry(credentials, expiry)

    def test_fetched_on_first_use_then_refreshed(self) -> None:
        # Profile roles, SSO and web identity: nothing until first use.
        now = datetime.now(timezone.utc).replace(microsecond=0)
        expiries = [now + timedelta(seconds=60), now + timedelta(hours=1)]
        credentials = DeferredRefreshableCredentials(
            refresh_using=lambda: metadata(expiries.pop(0)), method="assume-role"
        )
        self.assertIsNone(expiry_of(credentials))
        credentials.get_frozen_credentials()
        self.assert_expiry(credentials, now + timedelta(seconds=60))
        # Inside botocore's refresh window: the next use refreshes, and the
        # expiry read is the new one.
        credentials.get_frozen_credentials()
        self.assert_expiry(credentials, now + timedelta(hours=1))

    def test_no_expiry(self) -> None:
        self.assertIsNone(expiry_of(object()))
