"""XRayDaemon: the stop order, and what it says when a part fails to stop."""

from __future__ import annotations

import signal
from typing import Any

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


class _NotYetRunning:
    """Just enough reactor for XRayDaemon's signal set-up before reactor.run()."""

    running = False

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Any, dict[str, Any]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, **kw: Any) -> None:
        self.triggers.append((phase, event, f, kw))

    def callWhenRunning(self, f: Any) -> None:
        pass


class SignalSetupTests(SynchronousTestCase):
    def test_stop_signals_are_held_from_start_until_ours_are_in_place(self) -> None:
        # Held at once, before any child starts a thread (threads inherit the
        # mask), and released only by the "during startup" trigger that puts
        # our handlers back after the reactor's.
        stops = (signal.SIGTERM, signal.SIGINT)
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.addCleanup(signal.pthread_sigmask, signal.SIG_SETMASK, before)
        for signum in stops:
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        reactor = _NotYetRunning()
        seen: list[set[int]] = []

        class Child(Service):
            def startService(self) -> None:
                super().startService()
                seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

        daemon = XRayDaemon(reactor=reactor, handle_signals=True)
        Child().setServiceParent(daemon)
        daemon.startService()
        self.assertTrue(set(stops) <= seen[0], seen)
        (release,) = [t for t in reactor.triggers if t[:2] == ("during", "startup")]
        self.assertFalse(any(phase == "before" for phase, *_ in reactor.triggers))
        release[2](**release[3])
        self.assertFalse(set(stops) & set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        self.assertEqual(signal.getsignal(signal.SIGTERM), daemon._on_signal)
