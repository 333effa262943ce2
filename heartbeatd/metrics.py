"""heartbeatd's counters: in the sd_notify STATUS, the exit summary and Prometheus."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("streamkeeper.heartbeatd")


class HeartbeatMetrics:
    def __init__(self):
        self.lines_read = 0
        self.lines_matched = 0
        self.skipped_other = 0  # well-formed, not a viewing request
        self.skipped_malformed = 0
        self.skipped_bad_channel = 0
        self.too_long = 0
        self.flushes = 0
        self.channels_written = 0
        self.channels_not_running = 0
        self.redis_errors = 0
        self.newest_line_time = 0.0
        self._started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)

    def count_chunk(self, chunk) -> None:
        self.lines_read += chunk.lines
        self.lines_matched += chunk.matched
        self.skipped_other += chunk.other
        self.skipped_malformed += chunk.malformed
        self.skipped_bad_channel += chunk.bad_channel
        if chunk.newest_time > self.newest_line_time:
            self.newest_line_time = chunk.newest_time

    def count_flush(self, channels: int, running: int) -> None:
        self.flushes += 1
        self.channels_written += running
        self.channels_not_running += channels - running

    def lag(self) -> float:
        return max(0.0, time.time() - self.newest_line_time) if self.newest_line_time else 0.0

    def line_rate(self) -> float:
        now = time.monotonic()
        then, lines = self._rate_mark
        self._rate_mark = (now, self.lines_read)
        return (self.lines_read - lines) / (now - then) if now > then else 0.0

    def status_line(self) -> str:
        return (
            f"{self.line_rate():.0f} lines/s, {self.lines_read} read, "
            f"{self.lines_matched} viewing, lag {self.lag():.1f} s, "
            f"{self.redis_errors} redis errors"
        )

    def summary_line(self) -> str:
        elapsed = time.monotonic() - self._started
        return (
            f"lines read {self.lines_read}, viewing {self.lines_matched}, skipped: "
            f"other {self.skipped_other}, malformed {self.skipped_malformed}, "
            f"too long {self.too_long}, bad channel id {self.skipped_bad_channel}; "
            f"flushes {self.flushes}, channels written {self.channels_written}, "
            f"not running {self.channels_not_running}, redis errors {self.redis_errors}; "
            f"{elapsed:.3f} s, {self.lines_read / elapsed if elapsed > 0 else 0:.0f} lines/s"
        )

    def as_dict(self) -> dict:
        return {
            "lines_read": self.lines_read,
            "lines_matched": self.lines_matched,
            "skipped": {
                "other": self.skipped_other,
                "malformed": self.skipped_malformed,
                "too_long": self.too_long,
                "bad_channel": self.skipped_bad_channel,
            },
            "flushes": self.flushes,
            "redis_errors": self.redis_errors,
            "lag_seconds": self.lag(),
        }

    # -- Prometheus -------------------------------------------------------------
    def serve(self, listen: str) -> None:
        """Expose the counters on ``host:port`` (nothing when listen is empty)."""
        if not listen:
            return
        from prometheus_client import start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import CollectorRegistry

        metrics = self

        class _Collector:
            def collect(self):
                yield CounterMetricFamily(
                    "streamkeeper_heartbeat_lines_read", "Log lines read", value=metrics.lines_read
                )
                yield CounterMetricFamily(
                    "streamkeeper_heartbeat_lines_matched", "Viewing requests read", value=metrics.lines_matched
                )
                skipped = CounterMetricFamily(
                    "streamkeeper_heartbeat_lines_skipped", "Lines skipped, by reason", labels=["reason"]
                )
                for reason, value in metrics.as_dict()["skipped"].items():
                    skipped.add_metric([reason], value)
                yield skipped
                yield CounterMetricFamily("streamkeeper_heartbeat_flushes", "Heartbeat flushes", value=metrics.flushes)
                yield CounterMetricFamily(
                    "streamkeeper_heartbeat_redis_errors", "Failed Redis flushes", value=metrics.redis_errors
                )
                yield GaugeMetricFamily(
                    "streamkeeper_heartbeat_lag_seconds", "Now minus the newest line's time", value=metrics.lag()
                )

        registry = CollectorRegistry()
        registry.register(_Collector())
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        log.info("metrics on http://%s/metrics", listen)
