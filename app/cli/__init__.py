"""The `lastlogin` command: a thin shell over the library.

Domain errors become one line on stderr and a non-zero exit status here,
at the edge, and nowhere else.
"""

from __future__ import annotations

from .common import accept_global_options, main_group
from . import db as _db  # noqa: F401  (registers `db`)
from . import serve as _serve  # noqa: F401  (registers `serve`)
from . import rule as _rule  # noqa: F401  (registers `rule`, `check`)
from . import override as _override  # noqa: F401  (registers `override`, `alert`)
from . import report as _report  # noqa: F401  (registers `report`, `prune`)
from . import importing as _importing  # noqa: F401  (registers `import`)
from . import status as _status  # noqa: F401  (registers `status`)
from . import user as _user  # noqa: F401  (registers `user`)
from . import web as _web  # noqa: F401  (registers `web`)

accept_global_options(main_group)


def main() -> None:
    main_group(prog_name="lastlogin")


__all__ = ["main", "main_group"]
