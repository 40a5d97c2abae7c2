"""End to end: a real Dovecot 2.3 passes the client address it trusts (IMAP ID
x-originating-ip from a login_trusted_networks peer); the login is stored with
that address's country and ASN from the test GeoIP databases."""

from __future__ import annotations

import pytest

from tests.harness import geoipdb
from tests.harness.daemon import make_daemon
from tests.harness.db import events_of
from tests.harness.dovecot import make_dovecot
from tests.harness.mailclients import raw_session
from tests.harness.stack import running

pytestmark = pytest.mark.e2e

USER = b"alice@example.com"


@pytest.fixture(scope="module")
def stack(pg_url, tmp_path_factory):
    dbs = geoipdb.build(str(tmp_path_factory.mktemp("geoip")))
    daemon = make_daemon(pg_url, protocols="imap,pop3", geoip_country_db=dbs[0],
                         geoip_asn_db=dbs[1])
    dovecot = make_dovecot(daemon.socket_dir)
    # the test client on 127.0.0.1 may say which address it proxies for
    dovecot.extra = "login_trusted_networks = 127.0.0.0/8\n"
    with running(pg_url, daemon, dovecot, [USER]) as parts:
        yield parts


@pytest.mark.parametrize("address,country,asn", [(geoipdb.AT, "AT", 8447),
                                                 (geoipdb.JP6, "JP", 2516)])
def test_the_client_address_dovecot_reports_is_located(stack, address, country, asn):
    dovecot, _, engine = stack
    said = raw_session(dovecot.imap_port, [
        b'a0 ID ("x-originating-ip" "' + address.encode() + b'")',
        b"a1 LOGIN " + USER + b" secret"])
    assert b"a1 OK" in said, said
    ev = events_of(engine, USER)[-1]
    assert (ev.remote_ip, ev.country, ev.asn, ev.outcome) == (address, country, asn,
                                                              "allowed")
