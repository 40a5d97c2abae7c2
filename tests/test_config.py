import os

import pytest

from app.config import ConfigError, Settings, describe_settings, load_settings


def write(tmp_path, text):
    p = tmp_path / "lastlogin.toml"
    p.write_text(text)
    return p


def test_defaults_use_embedded_sqlite(tmp_path):
    s = load_settings(environ={"LASTLOGIN_DATA_DIR": str(tmp_path)})
    assert s.effective_database_url == f"sqlite:///{tmp_path}/lastlogin.db"
    assert s.protocols == ("imap", "pop3", "submission", "managesieve")
    assert s.socket_path("pop3") == os.path.join(s.socket_dir, "pop3.sock")


def test_file_values_are_read(tmp_path):
    p = write(tmp_path, 'database_url = "postgresql://u@127.0.0.1/db"\n'
                        'socket_dir = "/srv/ll"\nsocket_mode = "0600"\n'
                        'protocols = ["imap"]\nsocket_imap = "/x/i.sock"\n'
                        'allowed_uids = [0, "dovecot"]\n')
    s = load_settings(p, environ={})
    # plain postgresql:// is pinned to psycopg 3
    assert s.database_url == "postgresql+psycopg://u@127.0.0.1/db"
    assert s.socket_mode == 0o600
    assert s.socket_path("imap") == "/x/i.sock"
    assert s.allowed_uids == ("0", "dovecot")
    assert 0 in s.resolved_uids()


def test_environment_overrides_file(tmp_path):
    p = write(tmp_path, 'socket_dir = "/from/file"\nrequest_timeout = 3\n')
    s = load_settings(p, environ={"LASTLOGIN_SOCKET_DIR": "/from/env",
                                  "LASTLOGIN_PROTOCOLS": "imap, pop3"})
    assert s.socket_dir == "/from/env"
    assert s.request_timeout == 3.0
    assert s.protocols == ("imap", "pop3")


def test_config_file_from_environment(tmp_path):
    p = write(tmp_path, 'log_level = "debug"\n')
    s = load_settings(environ={"LASTLOGIN_CONFIG": str(p)})
    assert s.log_level == "debug"


@pytest.mark.parametrize("env,key,fragment", [
    ({"LASTLOGIN_SOCKET_MODE": "rw-rw----"}, "socket_mode", "octal mode"),
    ({"LASTLOGIN_REQUEST_TIMEOUT": "90"}, "request_timeout", "less than 60"),
    ({"LASTLOGIN_REQUEST_TIMEOUT": "soon"}, "request_timeout", "number of seconds"),
    ({"LASTLOGIN_PROTOCOLS": "imap,smtp"}, "protocols", "unknown protocol 'smtp'"),
    ({"LASTLOGIN_DATABASE_URL": "mysql://x/y"}, "database_url", "must start with"),
    ({"LASTLOGIN_BATCH_MAX": "0"}, "batch_max", "greater than 0"),
    ({"LASTLOGIN_LOG_FORMAT": "xml"}, "log_format", "one of kv, json"),
    ({"LASTLOGIN_SOCKET_GROUP": "no-such-group-here"}, "socket_group", "no such group"),
    ({"LASTLOGIN_SOKCET_DIR": "/x"}, "LASTLOGIN_SOKCET_DIR", "unknown setting"),
])
def test_bad_values_name_the_key(env, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert err.value.key == key
    assert fragment in err.value.reason


def test_unknown_key_in_file(tmp_path):
    p = write(tmp_path, 'sockets_dir = "/x"\n')
    with pytest.raises(ConfigError, match="sockets_dir: unknown setting"):
        load_settings(p, environ={})


def test_broken_toml_and_missing_file(tmp_path):
    p = write(tmp_path, 'socket_dir = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p, environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_test_variables_are_not_settings():
    # the harness's own variable must not be taken for a typo
    load_settings(environ={"LASTLOGIN_TEST_DATABASE_URL": "postgresql://x/y"})


def test_every_setting_is_documented():
    for key, env, doc in describe_settings():
        assert doc, key
        assert env == "LASTLOGIN_" + key.upper()
    assert len(describe_settings()) == len(Settings.__dataclass_fields__)
