"""`lastlogin serve`: the daemon's lifecycle, in one place and in order.

    startup()   directories, engine, rules in memory, recorder and its
                spool, sockets (bound or inherited), metrics, threads
    serve()     the event loop: accept and answer logins; signals only set
                a flag that this loop acts on (stop, reload, hand over)
    shutdown()  drain in-flight logins (bounded), then stop the threads in
                the order that keeps every record: refresher, retention,
                replayer, and last the writer (which closes its spool
                segment for a successor to replay)

Nothing here handles a login: that is app/server.py (bytes) and
app/service.py (decisions and records).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal

import sqlalchemy as sa

from .authpolicy import AuthPolicy, PolicySteps
from .config import ConfigError, Settings, load_settings
from .db import make_engine
from .db.engine import ReplyBound
from .db.migrate import ensure_at_head
from .geoip import GeoIP, GeoIPError
from .logs import first_line, show
from .maintenance import Maintenance
from .metrics import Metrics
from .notify import Notifier
from .policyhttp import PolicyServer
from .recorder import Recorder, Replayer
from .safedirs import prepare_daemon_dirs
from .server import Server
from .service import LoginService, Steps
from .snapshot import ConfigCache, Refresher
from .sockets import hand_over, notify_ready, sd_notify, take_listeners
from .spool import Spool
from .status import remove_own_status

log = logging.getLogger("lastlogin.daemon")

# Exit statuses of `lastlogin serve` (the CLI's table: README "Exit statuses").
EXIT_OK = 0
EXIT_FORCED = 1        # a stop cut short by a third SIGTERM or SIGINT
EXIT_CONFIG = 2             # a setting, a directory or a socket path is unusable
EXIT_SCHEMA = 3             # the database schema is not at head

# Settings a running daemon cannot change (SIGHUP): they need a restart.
FIXED_SETTINGS = ("database_url", "socket_dir", "protocols", "socket_imap", "socket_pop3",
                  "socket_submission", "socket_managesieve", "socket_mode", "socket_owner",
                  "socket_group", "max_connections", "data_dir", "spool_dir", "database_group",
                  "notify_command", "notify_timeout", "notify_queue",
                  "policy_listen")

STOP, RELOAD, HANDOVER = "stop", "reload", "handover"


def daemon_engines(s: Settings) -> tuple[sa.Engine, sa.Engine]:
    """The daemon's engine, and the one its writers and replayer use: on
    PostgreSQL that one opens each connection afresh (a pooled connection may
    have gone silent while idle, and the pool's ping has no bound)."""
    engine = make_engine(s.effective_database_url,
                         connect_timeout=max(1, math.ceil(s.record_timeout)),
                         write_bound=s.record_timeout,
                         file_group=s.database_group or None, tighten=True)
    if engine.dialect.name != "postgresql":
        return engine, engine
    return engine, make_engine(s.effective_database_url,
                               connect_timeout=max(1, math.ceil(s.record_timeout)),
                               write_bound=s.record_timeout, pooled=False)


class Daemon:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self._wanted: asyncio.Queue[str] | None = None

    # --- startup ---------------------------------------------------------------

    def startup(self) -> None:
        """Build everything from the settings. Raises before binding if the
        schema is not at head; a database that cannot be reached is not
        fatal (logins are spooled and decided by rules_unloaded_action)."""
        s = self.settings
        self.geoip = open_geoip(s)  # a missing or unreadable file: one line, exit 2
        prepare_daemon_dirs(s)      # socket, database and spool dirs: private or refused
        self.engine, self.write_engine = daemon_engines(s)
        self.cache = ConfigCache()
        self.refresher = Refresher(self.engine, self.cache)
        self.recorder = Recorder(self.engine, batch_max=s.batch_max,
                                 spool=Spool(s.effective_spool_dir, s.spool_max_bytes),
                                 spool_full_action=s.spool_full_action,
                                 reply_bound=ReplyBound.for_write_bound(s.record_timeout),
                                 write_engine=self.write_engine)
        try:
            ensure_at_head(self.engine)
            self.refresher.refresh()    # rules in memory before the first login
        except sa.exc.DBAPIError as exc:
            # Unreachable, refusing us, or a damaged SQLite file: an outage
            # (logins are spooled), never a crash loop that refuses them all.
            log.error("event=database_unreachable_at_start action=spooling error=%s",
                      show(first_line(exc)[:200]))
            self.recorder.down = True
        self.replayer = Replayer(self.write_engine, self.recorder,
                                 stuck_after=s.record_timeout)
        self.maintenance = Maintenance(self.engine, s.retention_days)
        self.notifier = Notifier(self.engine, s.notify_command, s.notify_timeout,
                                 s.notify_queue) if s.notify_command else None
        self.recorder.on_new_locations = self.notifier.submit if self.notifier else None
        self.service = LoginService(self.recorder, self.cache,
                                    Steps.from_settings(s, self.geoip))
        self.service.notifier = self.notifier
        if self.geoip is not None:
            log.info("event=geoip_loaded %s", show(self.geoip.describe()))
        self.server = Server(s, self.service, take_listeners(s))
        self.policy = AuthPolicy(self.recorder, self.cache, self.engine,
                                 PolicySteps.from_settings(s))
        self.policy_server = PolicyServer(s, self.policy) if s.policy_listen else None
        if s.metrics_listen:
            metrics = Metrics()
            metrics.watch(self.service.status)
            if self.policy_server is not None:
                metrics.watch_auto_blocks(self.policy.active_auto_blocks,
                                          self.policy.unstored_auto_blocks)
                self.policy.metrics = metrics
            metrics.serve(s.metrics_listen)
            self.service.metrics = metrics
            log.info("event=metrics_listening address=%s", s.metrics_listen)
        for thread in self._threads():
            thread.start()

    def _threads(self):
        extra = (self.notifier,) if self.notifier is not None else ()
        return (self.recorder, self.refresher, self.replayer, self.maintenance) + extra

    # --- serve -------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer logins until asked to stop (SIGTERM, SIGINT, a handover)."""
        loop = asyncio.get_running_loop()
        self._wanted = asyncio.Queue()
        for sig, what in ((signal.SIGTERM, STOP), (signal.SIGINT, STOP),
                          (signal.SIGHUP, RELOAD), (signal.SIGUSR2, HANDOVER)):
            loop.add_signal_handler(sig, self._wanted.put_nowait, what)
        self.recorder.attach(loop)      # commits from the loop while the database answers
        self.server.start()
        if self.policy_server is not None:
            await self.policy_server.start()    # bound before READY, or the start fails
        # What start-up built (settings, the engine, modules, the snapshot)
        # lives as long as the daemon: out of the collector's way, so that
        # a full collection walks only what logins made since.
        gc.collect()
        gc.freeze()
        notify_ready()
        status = asyncio.create_task(self.server.write_status())
        try:
            while True:
                what = await self._wanted.get()
                if what == RELOAD:
                    self.reload()
                elif what == HANDOVER and not await self.hand_over():
                    continue
                elif what in (STOP, HANDOVER):
                    break
        finally:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, while_stopping, sig)
            status.cancel()
            remove_own_status(self.settings.runtime_dir())
            sd_notify("STOPPING=1")
            if self.policy_server is not None:
                self.policy_server.close()
            await self.server.drain(self.settings.drain_timeout)
            if self.policy_server is not None:
                await self.policy_server.wait_closed(self.settings.drain_timeout)
            await self.policy.drain(self.settings.drain_timeout)
            await self.recorder.detach(self.settings.drain_timeout)

    def reload(self) -> None:
        """SIGHUP: re-read the settings; keep the old ones if the new are bad."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("event=reload_failed key=%s reason=%s", exc.key, show(exc.reason))
            return
        fixed = [k for k in FIXED_SETTINGS if getattr(new, k) != getattr(self.settings, k)]
        if fixed:
            log.warning("event=reload_needs_restart keys=%s", ",".join(fixed))
        self.geoip = self._reload_geoip(new)
        self.settings = new
        self.server.reconfigure(new)
        self.service.reconfigure(new, self.geoip)
        self.policy.reconfigure(new)
        if self.policy_server is not None:
            self.policy_server.reconfigure(new)
        logging.getLogger("lastlogin").setLevel(new.log_level.upper())
        log.info("event=reloaded")

    def _reload_geoip(self, new: Settings) -> GeoIP | None:
        """The same files: reopened (geoipupdate may have replaced them); other
        files: opened, or the old ones kept when they cannot be."""
        old = self.settings
        same = (new.geoip_country_db, new.geoip_asn_db) == (old.geoip_country_db,
                                                            old.geoip_asn_db)
        if same:
            if self.geoip is not None:
                self.geoip.reopen()
            return self.geoip
        try:
            geoip = GeoIP.from_settings(new)
        except GeoIPError as exc:
            log.error("event=reload_failed key=%s reason=%s", exc.key, show(exc.reason))
            return self.geoip
        log.info("event=geoip_loaded %s", show(geoip.describe() if geoip else "none"))
        return geoip

    async def hand_over(self) -> bool:
        """SIGUSR2: a successor takes the sockets; True once it is ready."""
        pid = await hand_over(self.server.listeners, self.settings.runtime_dir(),
                              self.config_path)
        return pid is not None

    # --- shutdown -----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the threads in order; the writer last, so every record queued
        by a drained login is written (or spooled) first."""
        self.server.close_listeners()
        self.refresher.stop()
        self.maintenance.stop()
        self.replayer.stop()
        if not self.recorder.stop(timeout=self.settings.drain_timeout):
            log.error("event=writer_stuck detail=\"records still queued at exit\"")
        if self.notifier is not None:
            self.notifier.stop(timeout=self.settings.notify_timeout)
        self.engine.dispose()
        self.write_engine.dispose()
        rec = self.recorder
        log.info("event=stopped records=%d commits=%d spooled=%d dropped=%d quarantined=%d",
                 rec.records, rec.commits, rec.spooled, rec.dropped, rec.quarantined)


def run(settings: Settings, config_path: str | None = None) -> int:
    """`lastlogin serve`: start, serve until asked, shut down; the exit status."""
    factory = loop_factory(settings.event_loop)        # a bad choice fails before anything
    daemon = Daemon(settings, config_path)
    daemon.startup()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(daemon.serve())
    finally:
        # Closing the loop gave the signals back their default action; a
        # second SIGTERM (an impatient operator) must not kill the writer
        # while it stores what the drained logins handed it.
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: while_stopping(signum))
        daemon.shutdown()
    return EXIT_OK


# Signals that would end (or re-enter) the daemon while it stops: logged and
# ignored from the first SIGTERM on; the stop itself is bounded by
# drain_timeout (logins in flight) and the writer's own timeout.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


_stop_signals_while_stopping = 0


def while_stopping(signum: int) -> None:
    """A signal once the daemon is stopping: ignored, except that a second
    extra SIGTERM or SIGINT ends the process at once (a stop that hangs, e.g.
    on a group lookup that never returns, must not need SIGKILL). Nothing
    acknowledged is lost either way: every answered login was committed or
    spooled before its answer."""
    global _stop_signals_while_stopping
    name = signal.Signals(signum).name
    if signum in (signal.SIGTERM, signal.SIGINT):
        _stop_signals_while_stopping += 1
        if _stop_signals_while_stopping >= 2:
            log.error("event=stop_forced signal=%s", name)
            logging.shutdown()
            os._exit(EXIT_FORCED)
        log.warning("event=signal_ignored signal=%s reason=stopping "
                    "detail=\"send it once more to stop at once\"", name)
        return
    log.warning("event=signal_ignored signal=%s reason=stopping", name)


def open_geoip(settings: Settings) -> GeoIP | None:
    try:
        return GeoIP.from_settings(settings)
    except GeoIPError as exc:
        raise ConfigError(exc.key, exc.reason) from None


def loop_factory(name: str):
    """The event loop the settings ask for (None: asyncio's own)."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("event_loop", "uvloop is not installed (pip install "
                              "'lastlogin[uvloop]')") from None
        return uvloop.new_event_loop
    return None
