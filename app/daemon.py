"""`lastlogin serve`: build everything from the settings, run, shut down."""

from __future__ import annotations

import asyncio
import logging
import math

import sqlalchemy as sa

from .config import Settings
from .db import make_engine
from .db.migrate import ensure_at_head
from .maintenance import Maintenance
from .metrics import Metrics
from .recorder import Recorder, Replayer, first_line
from .safedirs import prepare_daemon_dirs
from .server import Server
from .service import Extras, LoginService, Policy
from .snapshot import ConfigCache, Refresher
from .spool import Spool

log = logging.getLogger("lastlogin.daemon")


def run(settings: Settings, config_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Raises before binding if the schema is old.

    A database that cannot be reached at start is not fatal: logins are
    spooled and decided by `rules_unloaded_action` until it answers.
    """
    prepare_daemon_dirs(settings)       # socket, database and spool dirs: private or refused
    engine = make_engine(settings.effective_database_url,
                         connect_timeout=max(1, math.ceil(settings.record_timeout)),
                         write_bound=settings.record_timeout,
                         file_group=settings.database_group or None, tighten=True)
    cache = ConfigCache()
    refresher = Refresher(engine, cache)
    spool = Spool(settings.effective_spool_dir, settings.spool_max_bytes)
    recorder = Recorder(engine, batch_max=settings.batch_max, spool=spool,
                        spool_full_action=settings.spool_full_action)
    try:
        ensure_at_head(engine)
        refresher.refresh()             # rules in memory before the first login
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        log.error("event=database_unreachable_at_start action=spooling error=%s",
                  first_line(exc).replace(" ", "_")[:200])
        recorder.down = True
    replayer = Replayer(engine, recorder, stuck_after=settings.record_timeout)
    policy = Policy(cache, settings.default_action, settings.rules_unloaded_action)
    service = LoginService(recorder, policy, settings.record_timeout,
                           Extras.from_settings(settings))
    server = Server(settings, service, config_path)
    server.bind()
    if settings.metrics_listen:
        metrics = Metrics()
        metrics.watch(service.status)
        metrics.serve(settings.metrics_listen)
        service.metrics = metrics
        log.info("event=metrics_listening address=%s", settings.metrics_listen)
    maintenance = Maintenance(engine, settings.retention_days)
    threads = (recorder, refresher, replayer, maintenance)
    for t in threads:
        t.start()
    try:
        asyncio.run(server.serve())
    finally:
        server.close_listeners()
        refresher.stop()
        maintenance.stop()
        replayer.stop()
        if not recorder.stop(timeout=settings.drain_timeout):
            log.error("event=writer_stuck detail=\"records still queued at exit\"")
        engine.dispose()
        log.info("event=stopped records=%d commits=%d spooled=%d dropped=%d",
                 recorder.records, recorder.commits, recorder.spooled, recorder.dropped)
