"""Sockets bound while the service is built (so a port in use is a startup error),
the service base that hands them to the reactor, and what the listeners share:
the held-bytes budget and the bounded HTTP Site.

``ingest`` and ``tcpport`` both import from here; nothing here imports them.
"""
