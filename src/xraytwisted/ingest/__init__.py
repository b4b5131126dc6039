"""Ingest: bytes from SDKs in, accepted documents out to the buffer: the shared core,
the header rules, UDP datagrams, the TCP segment stream and the UDP drop monitor.
"""
