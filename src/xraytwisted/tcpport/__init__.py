"""The TCP port (2000): HTTP told apart from the segment stream, and its twisted.web
side: the sampling proxy, local sampling answers, /health and /metrics.
"""
