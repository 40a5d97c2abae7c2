"""The one divergence found: a BEFORE INSERT trigger on login_events that fills
in the row's place (an operator's DB-side GeoIP, say). PG_BATCH's placed CTE
reads what the insert RETURNed, so it stores that place; PG_BATCH_UNLOCATED
(like the pre-existing PG_LEAN_ALLOWED for a batch of one) does not.
Own throw-away server.  Usage: PYTHONPATH=/work/main python trigger_case.py
"""
from __future__ import annotations

import datetime as dt
import uuid

from app.db import make_engine, writers
from app.db.migrate import upgrade
from app.login import LoginRecord
from tests.harness.pg import create_database, start_server

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)
TRIGGER = """
CREATE FUNCTION fill_country() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.country IS NULL AND NEW.remote_ip << inet '198.51.100.0/24' THEN
    NEW.country := 'ZZ';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER fill_country BEFORE INSERT ON login_events
  FOR EACH ROW EXECUTE FUNCTION fill_country();
"""


def main() -> None:
    server = start_server()
    try:
        out = {}
        for label, name, one_row in (("PG_BATCH", writers._BATCH, False),
                                     ("PG_BATCH_UNLOCATED", writers._BATCH_UNLOCATED, False),
                                     ("writer batch of 2 (statement())", None, False),
                                     ("writer batch of 1 (PG_LEAN_ALLOWED)", None, True)):
            url = create_database(server.url())
            upgrade(url)
            engine = make_engine(url)
            with engine.begin() as conn:
                conn.exec_driver_sql(TRIGGER)
            w = writers.PostgresWriter(engine)
            w.one_row_statement = one_row
            recs = [LoginRecord(event_id=uuid.uuid4(), occurred_at=T0 + dt.timedelta(seconds=i),
                                username=b"a@example.com", protocol="imap",
                                remote_ip="198.51.100.7", local_ip="192.0.2.25",
                                outcome="allowed") for i in range(2)]
            if one_row:
                for r in recs:
                    w.write([r])
            elif name is None:
                print(label, "statement() picks", w.statement(recs)[0])
                w.write(recs)
            else:
                from psycopg.adapt import PyFormat
                params = writers.pg_params(recs)
                w._conn()
                names = writers._PREPARED[name][1]
                vals = w._tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))
                w.outcome(w.reply(w._run(name, vals)))
            with engine.connect() as conn:
                out[label] = (conn.exec_driver_sql(
                    "SELECT username, kind, place FROM login_places ORDER BY 1, 2, 3").fetchall(),
                    conn.exec_driver_sql("SELECT country FROM login_events").fetchall())
            w.close()
            engine.dispose()
        for k, v in out.items():
            print(f"{k}: login_places={v[0]} stored countries={v[1]}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
