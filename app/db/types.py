"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """timestamptz on PostgreSQL; on SQLite an ISO string in UTC.

    Always hands back an aware datetime in UTC, whatever the backend.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class _AddressBase(sa.TypeDecorator[str]):
    """A network value kept as ``inet``/``cidr`` on PostgreSQL, text elsewhere.

    Values go in and come out as canonical text (``ipaddress`` form).
    """

    impl = sa.String(64)
    cache_ok = True
    pg_type: Any = None

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(self.pg_type())
        return dialect.type_descriptor(sa.String(64))

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else str(value)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else self.canonical(value)

    @staticmethod
    def canonical(value: Any) -> str:
        raise NotImplementedError


@functools.lru_cache(maxsize=4096)
def _canonical_address(value: Any) -> str:
    # Cached: the same client and server addresses come back login after
    # login, and parsing one was a sixth of the SQLite writer's Python.
    return str(ipaddress.ip_address(value))


class IPAddress(_AddressBase):
    pg_type = postgresql.INET
    cache_ok = True

    @staticmethod
    def canonical(value: Any) -> str:
        try:
            return _canonical_address(value)
        except TypeError:           # unhashable: ipaddress says what is wrong with it
            return str(ipaddress.ip_address(value))


class IPNetwork(_AddressBase):
    pg_type = postgresql.CIDR
    cache_ok = True

    @staticmethod
    def canonical(value: Any) -> str:
        return str(ipaddress.ip_network(value, strict=True))
