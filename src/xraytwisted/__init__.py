"""xraytwisted: the AWS X-Ray daemon as a Twisted application.

Data path: ingest (UDP, TCP) -> buffer -> batcher -> uploader -> X-Ray.
"""

__version__ = "0.1.0"
