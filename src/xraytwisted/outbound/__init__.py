"""How the daemon reaches AWS: the treq client and its TLS trust, the choice of an
outbound HTTP proxy (NO_PROXY), and CONNECT tunnels through one.
"""
