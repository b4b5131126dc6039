"""The private Twisted names behind xraytwisted.outbound.twisted_private: still there, still used.

Each failure names the private name that changed.  The behaviour itself (a
CA from AWS_CA_BUNDLE trusted next to the system store, over real TLS) is
tested in tests/outbound/test_http_client.py (TrustStoreTests).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from tests.support.tls import new_ca
from xraytwisted.outbound.twisted_private import SystemTrustPlus, system_trust_plus

ADAPTER = "xraytwisted.outbound.twisted_private (AWS_CA_BUNDLE added to the system store)"


class TrustRootTests(SynchronousTestCase):
    def test_the_private_interface_is_still_there(self) -> None:
        try:
            from twisted.internet._sslverify import IOpenSSLTrustRoot
        except ImportError as e:
            self.fail(
                f"twisted.internet._sslverify.IOpenSSLTrustRoot is gone ({e}); adapt {ADAPTER}"
            )
        self.assertIn(
            "_addCACertsToContext",
            list(IOpenSSLTrustRoot.names()),
            f"IOpenSSLTrustRoot._addCACertsToContext was renamed; adapt {ADAPTER}",
        )
        system = platformTrust()
        self.assertTrue(
            IOpenSSLTrustRoot.providedBy(system) and hasattr(system, "_addCACertsToContext"),
            f"platformTrust() no longer provides IOpenSSLTrustRoot._addCACertsToContext; "
            f"adapt {ADAPTER}",
        )
        self.assertTrue(IOpenSSLTrustRoot.providedBy(system_trust_plus(())))

    def test_twisted_calls_it_and_the_extra_ca_verifies(self) -> None:
        ca = new_ca()
        extra = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        calls: list[SSL.Context] = []

        class Recording(SystemTrustPlus):
            def _addCACertsToContext(self, context: SSL.Context) -> None:
                calls.append(context)
                super()._addCACertsToContext(context)

        creator = optionsForClientTLS("xray.example.invalid", trustRoot=Recording([extra]))
        protocol: Any = TLSMemoryBIOFactory(
            creator, True, Factory.forProtocol(Protocol)
        ).buildProtocol(None)
        connection = creator.clientConnectionForTLS(protocol)
        self.assertEqual(
            calls,
            [connection.get_context()],
            "optionsForClientTLS no longer calls trustRoot._addCACertsToContext(context) for "
            f"the context its connections use; adapt {ADAPTER}",
        )
        # The extra CA is in that context's store: a certificate it issued verifies.
        store = connection.get_context().get_cert_store()
        assert store is not None
        leaf = ca.issue_cert("xray.example.invalid").cert_chain_pems[0].bytes()
        crypto.X509StoreContext(
            store, crypto.load_certificate(crypto.FILETYPE_PEM, leaf)
        ).verify_certificate()
