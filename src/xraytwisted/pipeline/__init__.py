"""From accepted documents to X-Ray: the buffer, the batcher and its backoff, the disk
spool, the PutTraceSegments uploader and its offline stand-in (the local sink).
"""
