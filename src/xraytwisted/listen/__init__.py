"""Sockets bound while the service is built (so a port in use is a startup error)
and the service base that hands them to the reactor.
"""
