"""What the daemon says about itself: the counters, X-Ray telemetry records and the
Go-format log lines.
"""
