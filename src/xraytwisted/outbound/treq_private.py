"""The one place xraytwisted relies on what treq does with a URL inside ``request``.

Why: ``treq.client.HTTPClient.request`` publicly accepts a str, bytes, a
``hyperlink.EncodedURL`` or a ``DecodedURL``, and turns every one of them,
on every request, into URI text with ``url.to_uri().to_text()``; that
re-validates the URL and IDNA-encodes its host each time.  For the fixed
X-Ray endpoint that was a tenth of the cost of an upload: about 45 us per
request whichever public form is passed, against 0.3 us for ``FixedURL``
(treq 26.7, hyperlink 21; see the commit that moved it here).  No public
treq or hyperlink API caches the conversion.

Relied upon, undocumented: that treq converts through ``to_uri()`` and then
``to_text()``, and that hyperlink's ``from_text`` builds the class it is
called on.  If either changes, ``FixedURL`` is still correct (it is a real
``EncodedURL``; URLs derived from it convert the normal way) but may stop
saving the work; ``tests/outbound/test_treq_private.py`` fails, naming
them, when an upgrade does that.
"""

from __future__ import annotations

from hyperlink import EncodedURL

__all__ = ["FixedURL"]


class FixedURL(EncodedURL):
    """An ASCII URL already in URI form, for requests sent again and again.

    This URL is its own URI and remembers its text, which treq then sends
    as given.  (That also makes IPv6 literals such as ``http://[::1]:2000/``
    work: treq's own conversion IDNA-encodes the host and fails on them.)
    """

    # Set only by ``of``: URLs hyperlink derives from this one (``replace``,
    # ``child``, ...) are of this class too, and convert the normal way.
    _fixed_text: str | None = None

    @classmethod
    def of(cls, text: str) -> FixedURL:
        text.encode("ascii")  # UnicodeEncodeError: not for non-ASCII URLs
        url = cls.from_text(text)
        assert isinstance(url, FixedURL)  # from_text builds a cls
        url._fixed_text = text
        return url

    def to_uri(self) -> EncodedURL:
        if self._fixed_text is not None:
            return self
        uri: EncodedURL = super().to_uri()
        return uri

    def to_text(self, with_password: bool = False) -> str:
        if self._fixed_text is not None and not with_password:
            return self._fixed_text
        text: str = super().to_text(with_password)
        return text
