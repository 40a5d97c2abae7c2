"""The codec against the examples of the protocol spec (sections 3, 5, 6, 9)."""

import pytest
from hypothesis import given, strategies as st

from app.protocol import (ProtocolError, alert_line, build_reply,
                          build_request, deny_line, parse_reply, parse_request,
                          request_complete, split_tabescaped,
                          tab_escape, tab_unescape)

SPEC_EXAMPLE = (
    b"VERSION\tscript-login\t1\t0\n"
    b"192.0.2.25\t198.51.100.7\talice@example.com\tuid=5000\tgid=5000\t"
    b"home=/var/vmail/example.com/alice\tmail=maildir:~/Maildir\t"
    b"quota_rule=*:storage=1G\tauth_mech=PLAIN\t"
    b"auth_token=3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12\n")


def test_spec_example_request():
    assert len(SPEC_EXAMPLE) == 234
    req = parse_request(SPEC_EXAMPLE)
    assert req.local_ip == b"192.0.2.25" and req.remote_ip == b"198.51.100.7"
    assert req.username == b"alice@example.com"
    assert req.fields[0] == b"uid=5000" and req.fields[-2] == b"auth_mech=PLAIN"
    assert req.auth_mech == b"PLAIN" and req.master_user is None
    assert build_request(req.local_ip, req.remote_ip, req.username, req.fields) == SPEC_EXAMPLE


def test_unknown_addresses_and_23_empty_field():
    req = parse_request(b"VERSION\tscript-login\t1\t0\n\t\talice\t\tauth_mech=PLAIN\n")
    assert (req.local_ip, req.remote_ip) == (b"", b"")
    assert req.fields == [b"auth_mech=PLAIN"]      # the 2.3 empty field is dropped


def test_bare_word_field_and_value_with_equals():
    req = parse_request(b"VERSION\tscript-login\t1\t0\n1\t2\tu\tanonymous\tx=a=b\n")
    assert req.fields == [b"anonymous", b"x=a=b"]


@pytest.mark.parametrize("raw,escaped", [
    (b"a\x01b", b"a\x011b"), (b"a\tb", b"a\x01tb"), (b"a\rb", b"a\x01rb"),
    (b"a\nb", b"a\x01nb"), (b"\xff\xfe", b"\xff\xfe"), (b"plain", b"plain"),
])
def test_escape_table(raw, escaped):
    assert tab_escape(raw) == escaped
    assert tab_unescape(escaped) == raw


def test_unescape_corner_cases():
    assert tab_unescape(b"x\x010y") == b"x\x00y"
    assert tab_unescape(b"x\x01zy") == b"xzy"          # unknown escape: the byte
    assert tab_unescape(b"abc\x01") == b"abc"          # trailing \001 dropped
    assert split_tabescaped(b"") == []                # empty line: no fields
    assert split_tabescaped(b"a\t\tb\t") == [b"a", b"", b"b", b""]
    assert split_tabescaped(b"a\x01\tz") == [b"a", b"z"]   # every raw TAB separates


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_escape_split_round_trip(values):
    line = b"\t".join(tab_escape(v) for v in values)
    assert b"\n" not in line
    assert split_tabescaped(line) == values or (values == [b""] and line == b"")


@pytest.mark.parametrize("buf,reason", [
    (b"VERSION\tscript-login\t1\t0\n", "incomplete"),
    (b"VERSION\tscript-login\t2\t0\n1\t2\tu\n", "unsupported protocol version"),
    (b"VERSION\tscript-login\t1\tx\n1\t2\tu\n", "unsupported protocol version"),
    (b"VERSION\tauth\t1\t0\n1\t2\tu\n", "not a script-login client"),
    (b"GET / HTTP/1.0\r\n\r\n", "not a script-login client"),
    (b"VERSION\tscript-login\t1\t0\n1\t2\n", "missing input fields"),
    (b"VERSION\tscript-login\t1\t0\n1\t2\t\n", "empty username"),
    (b"VERSION\tscript-login\t1\t0\n1\t2\tu\nextra", "bytes after the request"),
])
def test_bad_requests(buf, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_request(buf)


def test_framing_is_two_linefeeds_not_eof():
    assert not request_complete(b"VERSION\tscript-login\t1\t0\n1\t2")
    assert request_complete(b"VERSION\tscript-login\t1\t0\n1\t2\tu\n")


def test_reply_is_one_escaped_line():
    reply = build_reply(b"o'hara\tx", [b"uid=1", b"mail=maildir:/a\nb", b"auth_mech=PLAIN"])
    assert reply == b"o'hara\x01tx\tuid=1\tmail=maildir:/a\x01nb\tauth_mech=PLAIN\n"
    assert reply.count(b"\n") == 1 and not reply.startswith(b"VERSION")
    assert parse_reply(reply) == (b"o'hara\tx", [b"uid=1", b"mail=maildir:/a\nb",
                                                 b"auth_mech=PLAIN"])
    with pytest.raises(ValueError):
        build_reply(b"", [])


def test_deny_lines_per_protocol_are_single_lines():
    evil = "Go away\r\n* OK fake\r\na1 OK LOGIN done"
    lines = {p: deny_line(p, evil) for p in ("imap", "pop3", "submission", "managesieve")}
    assert lines["imap"].startswith(b"* BYE [ALERT] Go away")
    assert lines["pop3"].startswith(b"-ERR [AUTH] Go away")
    assert lines["submission"].startswith(b"421 4.7.0 Go away")
    assert lines["managesieve"].startswith(b'BYE "Go away')
    for line in lines.values():
        assert line.endswith(b"\r\n") and line.count(b"\n") == 1 and line.count(b"\r") == 1
    assert alert_line("hi\nthere") == b"* OK [ALERT] hi there\r\n"
    assert deny_line("imap", "") == b"* BYE [ALERT] Access denied.\r\n"
