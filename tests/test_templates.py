"""%-templates in override values and alert texts: pure expansion and refusals."""

from __future__ import annotations

import pytest

from app.errors import InvalidInput
from app.templates import (ExpansionRefused, LoginVars, TemplateError, check_template, expand,
                           expand_fields, parse)

ALICE = LoginVars.of(b"Alice@Example.com", "imap", b"198.51.100.7", b"192.0.2.25")


@pytest.mark.parametrize("template,expected", [
    ("maildir:/srv/mail/%d/%n", "maildir:/srv/mail/Example.com/Alice"),
    ("maildir:/srv/mail/%Ld/%Ln", "maildir:/srv/mail/example.com/alice"),
    ("%u", "Alice@Example.com"),
    ("%{user}|%{username}|%{domain}", "Alice@Example.com|Alice|Example.com"),
    ("%{user | username}/%{user|domain|lower}", "Alice/example.com"),
    ("%L{user}", "alice@example.com"),
    ("%Uu", "ALICE@EXAMPLE.COM"),
    ("%s %{service} %{protocol}", "imap imap imap"),
    ("%r %{rip} %{remote_ip}", "198.51.100.7 198.51.100.7 198.51.100.7"),
    ("%l %{lip} %{local_ip}", "192.0.2.25 192.0.2.25 192.0.2.25"),
    ("100%%", "100%"),
    ("%%d", "%d"),
    ("no variables", "no variables"),
    ("", ""),
])
def test_expansion(template, expected):
    assert expand(template, ALICE, "note") == expected


def test_username_without_domain_and_two_ats_as_dovecot():
    assert expand("%n|%d", LoginVars.of(b"bob", "pop3")) == "bob|"
    # Dovecot cuts at the first @
    assert expand("%n|%d", LoginVars.of(b"a@b@example.com", "pop3")) == "a|b@example.com"


@pytest.mark.parametrize("template,error", [
    ("%x", "unknown variable '%x' (write %% for a %)"),
    ("50%", "a lone % at the end: '%' (write %% for a %)"),
    ("%{home}", "unknown variable '%{home}'"),
    ("%{user|md5}", "unknown filter 'md5' in '%{user|md5}'"),
    ("%{user", "unclosed %{ in '%{user'"),
    ("%Lx", "unknown variable '%Lx' (write %% for a %)"),
])
def test_unknown_variables_are_refused(template, error):
    with pytest.raises(TemplateError) as exc:
        parse(template)
    assert str(exc.value) == error
    with pytest.raises(InvalidInput) as bad:
        check_template("value", template)
    assert bad.value.field == "value" and bad.value.reason == error


@pytest.mark.parametrize("user,reason", [
    (b"eve/../alice@example.com", "mail: %n would put a / into a path"),
    (b".hidden@example.com", "mail: %n would start a path element with a ."),
    (b"..@example.com", "mail: %n would start a path element with a ."),
    (b"tab\tuser@example.com", "mail: %n would put a TAB into a path"),
    (b"x@..", "mail: %d would start a path element with a ."),
    (b"x@a/b", "mail: %d would put a / into a path"),
    (b"caf\xe9@example.com", "mail: %d: the username is not UTF-8 text"),
    (b"x:INDEX=MEMORY@example.com", "mail: %n would put a : into a mail location"),
])
def test_unsafe_path_expansions_refuse_the_login(user, reason):
    v = LoginVars.of(user, "imap")
    with pytest.raises(ExpansionRefused) as exc:
        expand_fields({"mail": "maildir:/srv/mail/%d/%n"}, v)
    assert str(exc.value) == reason


@pytest.mark.parametrize("key,template,user", [
    ("namespace/inbox/location", "maildir:/srv/%n", b"../../etc@example.com"),
    ("mail_attribute_dict", "file:/srv/%n/attr", b"..@example.com"),
    ("sieve_before", "/srv/sieve/%u", b"eve/x@example.com"),
    ("quota_rule", "*:storage=1G:%n", b"eve/x@example.com"),
    ("mail_path", "/srv/mail/%d/%n", b"@example.com"),              # %n empty
])
def test_every_key_is_held_to_the_path_rules(key, template, user):
    """Dovecot has too many keys that take a location to list them: every
    override value refuses a username that would climb, split or vanish."""
    with pytest.raises(ExpansionRefused):
        expand_fields({key: template}, LoginVars.of(user, "imap"))
    fine = LoginVars.of(b"eve@example.com", "imap")
    assert "eve" in expand_fields({key: template}, fine)[key]


def test_an_empty_variable_outside_a_path_is_fine():
    v = LoginVars.of(b"admin", "imap")                # no @: %d is empty
    assert expand_fields({"acl_groups": "grp-%d"}, v) == {"acl_groups": "grp-"}


def test_fixed_values_and_nul_bytes():
    v = LoginVars.of(b"eve/x@example.com", "imap")
    assert expand_fields({"mail": "maildir:/srv/fixed"}, v) == {"mail": "maildir:/srv/fixed"}
    with pytest.raises(ExpansionRefused):          # a NUL would cut Dovecot's reply
        expand_fields({"note": "%u"}, LoginVars.of(b"a\x00b", "imap"))


