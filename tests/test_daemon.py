"""XRayDaemon: the stop order, and what it says when a part fails to stop."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.support.logs import capture_logs
from xraytwisted.daemon import XRayDaemon


class Recording(Service):
    def __init__(self, name: str, stops: list[str], error: Exception | None = None) -> None:
        self.setName(name)
        self.stops = stops
        self.error = error

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.stops.append(str(self.name))
        if self.error is not None:
            return fail(self.error)
        return None


class Exploding(Recording):
    def stopService(self) -> None:
        Service.stopService(self)
        self.stops.append(str(self.name))
        raise RuntimeError("the drain broke")


class StopTests(SynchronousTestCase):
    def test_a_failing_part_is_logged_by_name_and_the_rest_still_stops(self) -> None:
        events = capture_logs(self)
        stops: list[str] = []
        daemon = XRayDaemon()
        udp = Recording("udp", stops)
        batcher = Exploding("batcher", stops)
        telemetry = Recording("telemetry", stops, OSError(5, "Input/output error"))
        for child in (batcher, udp, telemetry):
            child.setServiceParent(daemon)
        daemon.ingest_services.append(udp)
        daemon.drain_services.append(batcher)
        cleaned: list[str] = []

        def close_spool() -> None:
            raise ValueError("spool close broke")

        daemon.cleanups += [close_spool, lambda: cleaned.append("sink")]
        daemon.startService()
        self.successResultOf(daemon.stopService())
        self.assertEqual(stops, ["udp", "batcher", "telemetry"])  # all, in order
        self.assertEqual(cleaned, ["sink"])
        errors = [e for e in events if e.get("log_level") == LogLevel.error]
        lines = [formatEvent(e) for e in errors]
        self.assertEqual(
            lines,
            [
                "Error while stopping batcher; stopping the rest anyway",
                "Error while stopping telemetry; stopping the rest anyway",
                "Error while stopping "
                "StopTests.test_a_failing_part_is_logged_by_name_and_the_rest_still_stops."
                "<locals>.close_spool; stopping the rest anyway",
            ],
        )
        # With what went wrong: the traceback goes with each line.
        self.assertEqual(
            [str(e["log_failure"].value) for e in errors],
            ["the drain broke", "[Errno 5] Input/output error", "spool close broke"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, OSError, ValueError)), 3)
