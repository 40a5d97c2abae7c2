"""Settings: one TOML file plus LASTLOGIN_* environment overrides.

Built once (``load_settings``), validated at load, then passed explicitly.
Every error names the key and the reason in one line (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import grp
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InvalidInput
from .login import PROTOCOLS, parse_network
from .timeparse import parse_duration

DEFAULT_CONFIG_PATH = Path("/etc/lastlogin/lastlogin.toml")
ENV_PREFIX = "LASTLOGIN_"
# Variables the daemon sets for itself (graceful restart) and the import
# command's source URL: not settings.
INTERNAL_ENV = frozenset({"handover_fds", "handover_notify", "import_source_url"})


class ConfigError(Exception):
    """A setting is missing, unknown or has a bad value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _systemd_dir(variable: str) -> str:
    # systemd sets STATE_DIRECTORY / RUNTIME_DIRECTORY (colon-separated when
    # a unit names several) for StateDirectory= / RuntimeDirectory=.
    return os.environ.get(variable, "").split(":")[0]


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/lastlogin"
    if _systemd_dir("STATE_DIRECTORY"):
        return _systemd_dir("STATE_DIRECTORY")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "lastlogin")


def _default_socket_dir() -> str:
    """/run/lastlogin as root; else systemd's RuntimeDirectory= or
    $XDG_RUNTIME_DIR/lastlogin. Never a shared directory such as /tmp, where
    another user could have made the directory first: without either
    variable the default is empty and using it is refused (``runtime_dir``)."""
    if os.geteuid() == 0:
        return "/run/lastlogin"
    if _systemd_dir("RUNTIME_DIRECTORY"):
        return _systemd_dir("RUNTIME_DIRECTORY")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "lastlogin")
    return ""


def _default_allowed_uids() -> tuple[str, ...]:
    # root: Dovecot's mail processes connect before they drop privileges.
    # Not dovenull (pre-authentication login processes) nor dovecot (the
    # internal user): neither runs post-login. The daemon's own uid may
    # connect (`lastlogin status` run as that user); a process of that uid
    # can already do anything the daemon can.
    return tuple(dict.fromkeys(("0", str(os.geteuid()))))


def _default_max_connections() -> int:
    """Sized to the open-file limit (the unit's LimitNOFILE=): a login holds
    up to 3 descriptors (its connection, the client fd, a reply or next-hop
    fd); 64 are left for the database, spool, metrics and the sockets."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, (soft - 64) // 3)


# The request is the user's userdb fields plus IPs and username. The mail
# process gets those fields from the auth process over the auth-master
# protocol, whose input is capped at 8 KiB per reply line (MAX_INBUF_SIZE in
# src/lib-auth/auth-master.c, 2.3 and 2.4), so no real request is near
# 64 KiB; the cap keeps one hostile peer's un-escaping and reply-building
# to a few milliseconds of the event loop.
DEFAULT_MAX_REQUEST_BYTES = 64 << 10


# --- value parsers: (value from TOML or env string) -> typed value ----------

def _as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {v!r}")
    return v


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ValueError(f"must be an integer, got {v!r}")


def _as_days(v: Any) -> int:
    n = _as_int(v)
    if n < 0:
        raise ValueError(f"must be 0 (keep forever) or a number of days, got {n}")
    return n


def _as_count(v: Any) -> int:
    n = _as_int(v)
    if n < 0:
        raise ValueError(f"must be 0 (off) or a positive number, got {n}")
    return n


def _v6_prefix(v: Any) -> int:
    n = _as_int(v)
    if not 32 <= n <= 128:
        raise ValueError(f"must be a prefix length from 32 to 128 (64: one subnet), got {n}")
    return n


def _as_positive_int(v: Any) -> int:
    n = _as_int(v)
    if n <= 0:
        raise ValueError(f"must be greater than 0, got {n}")
    return n


def _as_seconds(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"must be a number of seconds, got {v!r}")
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, got {v!r}") from None
    if not 0 < x < 60:
        # Dovecot gives the whole post-login step 60 s by default.
        raise ValueError(f"must be more than 0 and less than 60 seconds, got {v!r}")
    return x


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


def _listen_address(v: Any) -> str:
    s = _as_str(v).strip()
    if not s:
        return s
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port like 127.0.0.1:9464, got {v!r}")
    return s


def _span(v: Any) -> float:
    """A duration (``90s``, ``10min``, ``1h``, ``2d``) or a number of seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str) and v.strip().isdigit():
        seconds = float(v.strip())
    elif isinstance(v, str):
        try:
            d = parse_duration(v, "duration")
        except InvalidInput as exc:
            raise ValueError(exc.reason) from None
        if d.unit in ("months", "years"):
            raise ValueError(f"must be at most weeks, got {v!r}")
        seconds = float(d.amount * {"seconds": 1, "minutes": 60, "hours": 3600,
                                    "days": 86400, "weeks": 604800}[d.unit])
    else:
        raise ValueError(f"must be a duration like 10min or 1h, got {v!r}")
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, got {v!r}")
    return seconds


def _networks(v: Any) -> tuple[str, ...]:
    out = []
    for item in _as_list(v):
        try:
            out.append(str(parse_network(item)))
        except ValueError:
            raise ValueError(f"not an IPv4 or IPv6 network: {item!r}") from None
    return tuple(out)


def is_loopback_listen(address: str) -> bool:
    """Does a host:port listen address stay on this machine (empty host: 127.0.0.1)?"""
    host = address.rpartition(":")[0].strip("[]")
    if host in ("", "localhost"):
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _web_token(v: Any) -> str:
    # Never quoted in an error: it is a secret.
    s = _as_str(v).strip()
    if s and (len(s) < 16 or not s.isascii() or not s.isprintable() or " " in s):
        raise ValueError("must be at least 16 printable ASCII characters without spaces "
                         "(value not shown), e.g. from `openssl rand -hex 32`")
    return s


def _as_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        items = [p.strip() for p in v.split(",")]
        return tuple(p for p in items if p)
    if isinstance(v, list):
        return tuple(str(x) for x in v)
    raise ValueError(f"must be a list or a comma-separated string, got {v!r}")


def _as_mode(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        mode = v
    elif isinstance(v, str):
        try:
            mode = int(v.strip(), 8)
        except ValueError:
            raise ValueError(f"must be an octal mode like \"0660\", got {v!r}") from None
    else:
        raise ValueError(f"must be an octal mode like \"0660\", got {v!r}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"must be an octal mode like \"0660\", got {v!r}")
    return mode


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = _as_str(v).strip().lower()
        if s not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {v!r}")
        return s
    return parse


def _protocol_list(v: Any) -> tuple[str, ...]:
    items = _as_list(v)
    for p in items:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r} (known: {', '.join(PROTOCOLS)})")
    if not items:
        raise ValueError("must name at least one protocol")
    return items


def _database_url(v: Any) -> str:
    # Errors never quote the URL: it may hold a password.
    s = _as_str(v).strip()
    scheme = s.split(":", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg"):
        raise ValueError(
            "must start with sqlite:/// or postgresql+psycopg:// "
            f"(got scheme {scheme[:20]!r})")
    if "," in s.split("//", 1)[-1].split("/", 1)[0]:
        raise ValueError("several hosts go in the query, not before the database name: "
                         "postgresql+psycopg://user@/db?host=h1:5432&host=h2:5432"
                         "&target_session_attrs=read-write")
    if scheme == "postgresql":
        # Plain postgresql:// would make SQLAlchemy look for psycopg2.
        s = "postgresql+psycopg" + s[len("postgresql"):]
    if scheme != "sqlite":
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            url = make_url(s)
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (value not shown: it may hold a "
                             "password)") from None
        # "user:p@ss@host": the tail of the password would become the host
        # name and end up in connection errors.
        if "@" in (url.host or "") or "@" in (url.database or ""):
            raise ValueError("has an unescaped '@' in the user or password; "
                             "write '@' as %40 (value not shown: it may hold a password)")
    return s


def url_secrets(url: str) -> tuple[str, ...]:
    """The password of a database URL, as written and decoded, for redaction."""
    found = []
    head = url.split("://", 1)[-1].split("/", 1)[0]
    if "@" in head:
        userinfo = head.rsplit("@", 1)[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    try:
        from sqlalchemy.engine import make_url
        parsed = make_url(url)
        if parsed.password:
            found.append(str(parsed.password))
        for key in ("password", "sslpassword"):          # libpq takes them in the query too
            value = parsed.query.get(key)
            found += [value] if isinstance(value, str) else list(value or ())
    except Exception:  # noqa: BLE001 - a URL that does not parse still has its raw part
        pass
    from urllib.parse import unquote
    found += [unquote(f) for f in found]
    return tuple(sorted({f for f in found if len(f) >= 2}, key=len, reverse=True))


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, however malformed."""
    out = url
    for secret in url_secrets(url):
        out = out.replace(secret, "***")
    return out


def _host_name(v: Any) -> str:
    s = _as_str(v).strip()
    if not s or len(s) > 255 or not s.isprintable():
        raise ValueError(f"must be 1 to 255 printable characters, got {v!r}")
    return s


def _uid_list(v: Any) -> tuple[str, ...]:
    items = _as_list(v)
    for item in items:
        if not item.isdigit():
            try:
                pwd.getpwnam(item)
            except KeyError:
                # A user that does not exist here simply matches no peer.
                pass
    return items


def _group(v: Any) -> str:
    s = _as_str(v).strip()
    if s and not s.isdigit():
        try:
            grp.getgrnam(s)
        except KeyError:
            raise ValueError(f"no such group {s!r}") from None
    return s


def _user(v: Any) -> str:
    s = _as_str(v).strip()
    if s and not s.isdigit():
        try:
            pwd.getpwnam(s)
        except KeyError:
            raise ValueError(f"no such user {s!r}") from None
    return s


def _command(v: Any) -> tuple[str, ...]:
    """A program and its arguments, run without a shell: a TOML list, or a
    string split as a shell would split words (no expansion, no pipes)."""
    import shlex
    if isinstance(v, list):
        argv = tuple(_as_str(x) for x in v)
    else:
        try:
            argv = tuple(shlex.split(_as_str(v)))
        except ValueError as exc:
            raise ValueError(f"cannot split into words: {exc}") from None
    if not argv:
        return ()
    if not os.path.isabs(argv[0]):
        raise ValueError(f"the program must be an absolute path, got {argv[0]!r}")
    if not (os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK)):
        raise ValueError(f"{argv[0]} is not an executable file")
    return argv


def _opt(parse: Callable[[Any], Any], default: Any = None, *, factory: Any = None,
         doc: str = "") -> Any:
    meta = {"parse": parse, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the CLI read from the configuration."""

    data_dir: str = _opt(_as_str, factory=_default_data_dir,
                         doc="state directory (SQLite file, spool)")
    database_url: str = _opt(_database_url, "",
                             doc="SQLAlchemy URL; default: SQLite file in data_dir")
    database_group: str = _opt(_group, "",
                               doc="group that may read the SQLite database "
                                   "(default: none, files 0600)")
    report_database_url: str = _opt(_database_url, "",
                                    doc="URL reports read from (a standby); default: database_url")
    host_name: str = _opt(_host_name, factory=socket.gethostname,
                          doc="this mail host's name, stored with every login")
    socket_dir: str = _opt(_as_str, factory=_default_socket_dir,
                           doc="directory of the post-login sockets and status file "
                               "(non-root default: $RUNTIME_DIRECTORY or "
                               "$XDG_RUNTIME_DIR/lastlogin)")
    protocols: tuple[str, ...] = _opt(_protocol_list, PROTOCOLS,
                                      doc="protocols to listen for")
    socket_imap: str = _opt(_as_str, "", doc="path of the imap socket")
    socket_pop3: str = _opt(_as_str, "", doc="path of the pop3 socket")
    socket_submission: str = _opt(_as_str, "", doc="path of the submission socket")
    socket_managesieve: str = _opt(_as_str, "", doc="path of the managesieve socket")
    socket_mode: int = _opt(_as_mode, 0o660, doc="permission bits of the sockets")
    socket_owner: str = _opt(_user, "", doc="owner of the sockets (user name or uid)")
    socket_group: str = _opt(_group, "", doc="group of the sockets (group name or gid)")
    socket_backlog: int = _opt(_as_positive_int, 1024, doc="listen() backlog")
    allowed_uids: tuple[str, ...] = _opt(_uid_list, factory=_default_allowed_uids,
                                         doc="peers (uids or user names) that may connect")
    request_timeout: float = _opt(_as_seconds, 10.0,
                                  doc="seconds a peer has to send its whole request")
    max_request_bytes: int = _opt(_as_positive_int, DEFAULT_MAX_REQUEST_BYTES,
                                  doc="largest request accepted, in bytes")
    max_connections: int = _opt(_as_positive_int, factory=_default_max_connections,
                                doc="most connections served at once; more wait in the "
                                    "backlog (default: sized to the open-file limit)")
    record_timeout: float = _opt(_as_seconds, 2.0,
                                 doc="seconds a commit may take before the record is spooled")
    spool_dir: str = _opt(_as_str, "", doc="outage spool directory; default data_dir/spool")
    spool_max_bytes: int = _opt(_as_positive_int, 256 << 20,
                                doc="largest the outage spool may grow, in bytes")
    spool_full_action: str = _opt(_choice("allow", "refuse"), "allow",
                                  doc="when the spool is full: allow unrecorded, or refuse")
    client_write_timeout: float = _opt(_as_seconds, 5.0,
                                       doc="seconds to write a message to the client")
    drain_timeout: float = _opt(_as_seconds, 15.0,
                                doc="seconds to finish in-flight logins on shutdown")
    batch_max: int = _opt(_as_positive_int, 1000,
                          doc="most login records in one group commit")
    default_action: str = _opt(_choice("allow", "deny"), "allow",
                               doc="what a login gets when no access rule matches")
    rules_unloaded_action: str = _opt(_choice("allow", "deny"), "allow",
                                      doc="what a login gets while no rules were ever loaded")
    dovecot_version: str = _opt(_choice("2.3", "2.4"), "2.3",
                                doc="Dovecot's version, for override key warnings")
    acl_groups_from_system: bool = _opt(_as_bool, False,
                                        doc="add the login user's system groups to acl_groups")
    next_socket_imap: str = _opt(_as_str, "", doc="next post-login socket for imap")
    next_socket_pop3: str = _opt(_as_str, "", doc="next post-login socket for pop3")
    next_socket_submission: str = _opt(_as_str, "",
                                       doc="next post-login socket for submission")
    next_socket_managesieve: str = _opt(_as_str, "",
                                        doc="next post-login socket for managesieve")
    next_timeout: float = _opt(_as_seconds, 20.0,
                               doc="seconds the next post-login socket has to answer")
    retention_days: int = _opt(_as_days, 0,
                               doc="days of login history the daemon keeps (0: forever)")
    metrics_listen: str = _opt(_listen_address, "",
                               doc="host:port for Prometheus metrics, e.g. 127.0.0.1:9464 "
                                   "(empty: off)")
    web_listen: str = _opt(_listen_address, "127.0.0.1:8470",
                           doc="host:port the dashboard (`lastlogin web`) listens on; "
                               "a non-loopback address needs web_token")
    web_token: str = _opt(_web_token, "",
                          doc="token the dashboard asks for (Bearer or its login form); "
                              "empty: none, loopback only")
    web_secure_cookie: bool = _opt(_as_bool, False,
                                   doc="mark the dashboard's session cookie Secure (set it "
                                       "when a TLS proxy serves it as https)")
    log_level: str = _opt(_choice("debug", "info", "warning", "error"), "info",
                          doc="log level")
    event_loop: str = _opt(_choice("asyncio", "uvloop"), "asyncio",
                           doc="the daemon's event loop: asyncio, or uvloop (libuv)")
    log_format: str = _opt(_choice("kv", "json"), "kv", doc="log line format")
    geoip_country_db: str = _opt(_as_str, "",
                                 doc="MaxMind-format country (or city) database, e.g. "
                                     "GeoLite2-Country.mmdb (empty: no countries)")
    geoip_asn_db: str = _opt(_as_str, "",
                             doc="MaxMind-format ASN database, e.g. GeoLite2-ASN.mmdb "
                                 "(empty: no ASNs)")
    store_ip: str = _opt(_choice("full", "truncated", "none"), "full",
                         doc="client addresses kept: full, truncated (/24 IPv4, /48 IPv6) "
                             "or none; applied before anything is stored, spooled or logged")
    notify_command: tuple[str, ...] = _opt(_command, (),
                                           doc="program run (no shell) for each login from "
                                               "a new location; one JSON object on stdin")
    notify_timeout: float = _opt(_as_seconds, 10.0,
                                 doc="seconds notify_command may run before it is killed")
    notify_queue: int = _opt(_as_positive_int, 1000,
                             doc="new-location notifications waiting at most; more are "
                                 "dropped with a log line")
    policy_listen: str = _opt(_listen_address, "",
                              doc="host:port of the Dovecot auth policy endpoint, e.g. "
                                  "127.0.0.1:8471 (empty: off; not loopback: needs "
                                  "policy_api_key)")
    policy_api_key: str = _opt(_as_str, "",
                               doc="key Dovecot must send (auth_policy_server_api_header = "
                                   "X-API-Key: <key>); empty: none asked")
    block_after_failures: int = _opt(_as_count, 0,
                                     doc="failed authentications (per address, per user) "
                                         "within block_window that add a deny rule (0: off)")
    block_window: float = _opt(_span, 600.0, doc="window failures are counted in (10min)")
    block_for: float = _opt(_span, 3600.0, doc="how long an automatic deny rule lasts (1h)")
    block_exempt_networks: tuple[str, ...] = _opt(
        _networks, (), doc="networks never blocked automatically (webmail, proxies)")
    block_usernames: bool = _opt(_as_bool, False,
                                 doc="also block a username after block_after_failures "
                                     "failures from anywhere (off: anyone could lock any "
                                     "account out; see docs/policy-server.md)")
    block_ipv6_prefix: int = _opt(_v6_prefix, 64,
                                  doc="IPv6 failures are counted and blocked per network of "
                                      "this prefix length (64: one subnet)")

    def __post_init__(self) -> None:
        if (self.policy_listen and not is_loopback_listen(self.policy_listen)
                and not self.policy_api_key):
            raise ConfigError("policy_api_key", f"policy_listen {self.policy_listen} is not "
                              "a loopback address: set policy_api_key (and Dovecot's "
                              "auth_policy_server_api_header) so others cannot ask or report")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{os.path.join(self.data_dir, 'lastlogin.db')}"

    def runtime_dir(self) -> str:
        """socket_dir, or a ConfigError when there is none (non-root, no
        $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR)."""
        if not self.socket_dir:
            raise ConfigError("socket_dir", "not set, and neither $RUNTIME_DIRECTORY nor "
                              "$XDG_RUNTIME_DIR is; set socket_dir to a directory of "
                              "this user's (there is no /tmp fallback)")
        return self.socket_dir

    def socket_path(self, protocol: str) -> str:
        explicit = getattr(self, f"socket_{protocol}")
        return explicit or os.path.join(self.runtime_dir(), f"{protocol}.sock")

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be shown: the database password, the keys, the web token."""
        found = url_secrets(self.database_url) if self.database_url else ()
        return (found + ((self.policy_api_key,) if self.policy_api_key else ())
                + ((self.web_token,) if self.web_token else ()))

    @property
    def effective_spool_dir(self) -> str:
        return self.spool_dir or os.path.join(self.data_dir, "spool")

    def next_socket(self, protocol: str) -> str:
        return getattr(self, f"next_socket_{protocol}")

    def resolved_uids(self) -> frozenset[int]:
        uids = set()
        for item in self.allowed_uids:
            if item.isdigit():
                uids.add(int(item))
            else:
                try:
                    uids.add(pwd.getpwnam(item).pw_uid)
                except KeyError:
                    pass
        return frozenset(uids)



def describe_settings() -> list[tuple[str, str, str]]:
    """(key, env variable, doc) for the configuration reference."""
    return [(f.name, ENV_PREFIX + f.name.upper(), f.metadata["doc"])
            for f in dataclasses.fields(Settings)]


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except PermissionError:
        raise ConfigError("config", f"cannot read {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read the file (if any), apply LASTLOGIN_* overrides, validate."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = _read_file(Path(path)) if path is not None else {}

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for key in raw:
        if key not in fields:
            raise ConfigError(key, f"unknown setting in {path}")
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in fields:
            raw[key] = value
        elif not key.startswith(("test_", "bench_")) and key not in INTERNAL_ENV:
            raise ConfigError(name, "unknown setting")

    values = {}
    for key, value in raw.items():
        try:
            values[key] = fields[key].metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return Settings(**values)
