"""Builders with realistic defaults, so each test states only what matters."""

from __future__ import annotations

import datetime as dt
import random
import string
import uuid

from app.login import LoginRecord
from app.protocol import LoginRequest, build_request

T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)

HOSTILE_USERNAMES = [
    b"o'hara;--",
    b"robert'); DROP TABLE login_events;--",
    b'back\\slash"quote',
    b"semi;colon$USER`id`",
    b"tab\there",
    b"line\nfeed\rcarriage",
    b"ctl\x01byte",
    b"caf\xc3\xa9@example.com",          # UTF-8
    b"latin1-\xe9\xff@example.com",       # not UTF-8
    b"%s%n%x{}",
    b"A" * 4096,
    # 3,000 bytes that do not compress: past PostgreSQL's btree row limit
    "".join(random.Random(3000).choices(string.ascii_letters + string.digits, k=3000)).encode(),
]


def record(username: bytes = b"alice@example.com", *, protocol: str = "imap",
           at: dt.datetime = T0, remote_ip: str | None = "198.51.100.7",
           local_ip: str | None = "192.0.2.25", outcome: str = "allowed",
           **extra) -> LoginRecord:
    return LoginRecord(event_id=uuid.uuid4(), occurred_at=at, username=username,
                       protocol=protocol, remote_ip=remote_ip, local_ip=local_ip,
                       outcome=outcome, auth_mech=b"PLAIN", **extra)


def request_fields(home: bytes = b"/var/vmail/alice") -> list[bytes]:
    return [b"uid=5000", b"gid=5000", b"home=" + home, b"mail=maildir:~/Maildir",
            b"auth_mech=PLAIN",
            b"auth_token=3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12"]


def request_bytes(username: bytes = b"alice@example.com", *, local_ip: bytes = b"192.0.2.25",
                  remote_ip: bytes = b"198.51.100.7", fields: list[bytes] | None = None) -> bytes:
    return build_request(local_ip, remote_ip, username,
                         request_fields() if fields is None else fields)


def login_request(username: bytes = b"alice@example.com") -> LoginRequest:
    return LoginRequest(b"192.0.2.25", b"198.51.100.7", username, request_fields())
