"""Opt-in Prometheus metrics (prometheus-client), served on loopback by default.

A registry of its own, so nothing else in the process shows up, and a
collector that reads the daemon's state at scrape time (spool size, rules
age, database state) instead of a thread keeping gauges current.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .status import DaemonStatus

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.logins = Counter("lastlogin_logins", "Logins answered, by protocol and outcome",
                              ["protocol", "outcome"], registry=self.registry)
        self.refused_connections = Counter(
            "lastlogin_refused_connections", "Connections ended without a reply "
            "(malformed, foreign, too slow, not recordable)", registry=self.registry)
        self.decision_seconds = Histogram(
            "lastlogin_decision_seconds", "Time to decide a login (rules, overrides, alerts)",
            buckets=BUCKETS, registry=self.registry)
        self.record_seconds = Histogram(
            "lastlogin_record_seconds", "Time until a login's record was durable",
            buckets=BUCKETS, registry=self.registry)
        self.policy_checks = Counter(
            "lastlogin_policy_checks", "Dovecot auth policy checks before authentication, "
            "by result (allowed, rejected)", ["result"], registry=self.registry)
        self.policy_failures = Counter(
            "lastlogin_policy_failures", "Failed authentications Dovecot reported",
            registry=self.registry)
        self.policy_refused = Counter(
            "lastlogin_policy_requests_refused", "Policy requests answered with an HTTP "
            "error (API key, size, malformed)", registry=self.registry)
        self.policy_connections_refused = Counter(
            "lastlogin_policy_connections_refused", "Policy connections closed at once, "
            "unread: nothing could be evicted to make room (too_many, too_many_from_peer)",
            ["reason"], registry=self.registry)
        self.policy_evicted = Counter(
            "lastlogin_policy_connections_evicted", "Policy connections closed to make room "
            "for a new one (idle, or not yet through a request with the API key)",
            registry=self.registry)

    def watch_auto_blocks(self, active: Callable[[], int],
                          unstored: Callable[[], int] = lambda: 0) -> None:
        """The number of automatic blocks in force (and of those that could not
        be stored, held in memory only), read at every scrape."""
        self.registry.register(_AutoBlocks(active, unstored))

    def watch(self, state: Callable[[], "DaemonStatus"]) -> None:
        """Gauges read from ``state()`` at every scrape."""
        self.registry.register(_StateCollector(state))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                          registry=self.registry)


class _AutoBlocks:
    def __init__(self, active: Callable[[], int], unstored: Callable[[], int]) -> None:
        self.active = active
        self.unstored = unstored

    def collect(self):
        yield GaugeMetricFamily("lastlogin_auto_blocks_active",
                                "Automatic deny rules in force (block_after_failures)",
                                value=float(self.active()))
        yield GaugeMetricFamily("lastlogin_auto_blocks_unstored",
                                "Automatic blocks that could not be stored as rules (held in "
                                "memory until they expire; not in rule list)",
                                value=float(self.unstored()))

    def describe(self):
        return []


class _StateCollector:
    def __init__(self, state: Callable[[], "DaemonStatus"]) -> None:
        self.state = state

    def collect(self):
        s = self.state()
        yield GaugeMetricFamily("lastlogin_spool_bytes", "Bytes waiting in the outage spool",
                                value=float(s.spool_bytes))
        yield GaugeMetricFamily("lastlogin_database_down",
                                "1 while records go to the spool instead of the database",
                                value=1.0 if s.database_down else 0.0)
        yield CounterMetricFamily("lastlogin_database_errors",
                                  "Commits that failed or took longer than record_timeout",
                                  value=float(s.database_errors))
        yield GaugeMetricFamily("lastlogin_config_rows_skipped",
                                "Rule, override and alert rows the loader left out",
                                value=float(len(s.config_skipped)))
        yield GaugeMetricFamily("lastlogin_quarantined_records",
                                "Records set aside in the quarantine (see docs/reliability.md)",
                                value=float(s.quarantined))
        yield GaugeMetricFamily("lastlogin_logins_refused_spool_full",
                                "1 while logins are refused (or let in unrecorded) because "
                                "the spool cannot take records",
                                value=1.0 if (s.refusing or s.unrecorded) else 0.0)
        yield CounterMetricFamily("lastlogin_new_locations",
                                  "Logins from a country (or ASN) new for their user",
                                  value=float(s.new_locations))
        yield CounterMetricFamily("lastlogin_notify_failures",
                                  "notify_command runs that failed, timed out or were "
                                  "dropped (queue full)", value=float(s.notify_failed))
        age = s.config_checked_age
        yield GaugeMetricFamily("lastlogin_rules_age_seconds",
                                "Seconds since the rules in memory were confirmed current "
                                "(-1: never loaded)", value=float(-1 if age is None else age))

    def describe(self):
        return []
