"""The one place xraytwisted uses a private Twisted name: trusting the system store *plus* CAs.

Why private: ``AWS_CA_BUNDLE`` adds CA certificates to the platform's trust
store (see ``http_client``).  Twisted's public API trusts either the store
(``platformTrust()``) or given certificates (``trustRootFromCertificates``),
never both.  Both return a ``twisted.internet._sslverify.IOpenSSLTrustRoot``,
whose only method, ``_addCACertsToContext``, Twisted calls while it builds a
TLS context; implementing it is the only way to add to the store.  There is
no later public hook either: pyOpenSSL refuses changes to a context's trust
(``load_verify_locations``, ``set_default_verify_paths``) once a connection
uses it, which ``optionsForClientTLS`` does as soon as it makes one.

Without ``AWS_CA_BUNDLE`` nothing here is used (``platformTrust()`` as is).
``tests/outbound/test_twisted_private.py`` fails, naming the private names,
when a Twisted upgrade changes them.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import platformTrust
from zope.interface import implementer

__all__ = ["SystemTrustPlus", "system_trust_plus"]


@implementer(IOpenSSLTrustRoot)
class SystemTrustPlus:
    """The platform's trust store plus some extra CA certificates.

    Done the way Twisted's own ``OpenSSLDefaultPaths`` and
    ``OpenSSLCertificateAuthorities`` do it, so certificate and host name
    checks stay Twisted's.
    """

    def __init__(self, extra: Sequence[x509.Certificate] = ()) -> None:
        self.extra = tuple(extra)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        platformTrust()._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None
        for cert in self.extra:
            store.add_cert(X509.from_cryptography(cert))


def system_trust_plus(extra: Sequence[x509.Certificate]) -> IOpenSSLTrustRoot:
    """A trust root for ``optionsForClientTLS``: the system store and ``extra``."""
    return SystemTrustPlus(extra)
