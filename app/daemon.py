"""`lastlogin serve`: build everything from the settings, run, shut down."""

from __future__ import annotations

import asyncio
import logging

from .config import Settings
from .db import make_engine
from .db.migrate import ensure_at_head
from .maintenance import Maintenance
from .recorder import Recorder
from .server import Server
from .service import Extras, LoginService, Policy
from .snapshot import ConfigCache, Refresher

log = logging.getLogger("lastlogin.daemon")


def run(settings: Settings, config_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Raises before binding if the schema is old."""
    engine = make_engine(settings.effective_database_url)
    ensure_at_head(engine)
    cache = ConfigCache()
    refresher = Refresher(engine, cache)
    refresher.refresh()             # rules in memory before the first login
    recorder = Recorder(engine, batch_max=settings.batch_max)
    policy = Policy(cache, settings.default_action, settings.rules_unloaded_action)
    service = LoginService(recorder, policy, settings.record_timeout, Extras.from_settings(settings))
    server = Server(settings, service, config_path)
    server.bind()
    maintenance = Maintenance(engine, settings.retention_days)
    recorder.start()
    refresher.start()
    maintenance.start()
    try:
        asyncio.run(server.serve())
    finally:
        server.close_listeners()
        refresher.stop()
        maintenance.stop()
        if not recorder.stop(timeout=settings.drain_timeout):
            log.error("event=writer_stuck detail=\"records still queued at exit\"")
        engine.dispose()
        log.info("event=stopped records=%d commits=%d", recorder.records, recorder.commits)

