"""Database access: engines, migrations, named queries."""

from .engine import make_engine

__all__ = ["make_engine"]
