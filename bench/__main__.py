"""The whole comparison, one command:

    python -m bench              # through Dovecot (all modes), then handler-only
    python -m bench --reports    # ... and reports at 10 million events (~10 min more)
    python -m bench --scaling    # ... and one vs two daemons, WAL and size (~3 min more)

Installs nothing itself: needs the Debian packages dovecot-imapd,
dovecot-pop3d, dovecot-pgsql, postgresql and postgresql-client (scripts/bench
installs them). Every part writes its table into docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> None:
    parts = [["bench.dovecot_modes"], ["bench.handler", "--profile"]]
    if "--reports" in sys.argv[1:]:
        parts.append(["bench.reports_at_scale"])
    if "--scaling" in sys.argv[1:]:
        parts.append(["bench.multihost"])       # into docs/scaling.md
    for part in parts:
        print(f"== python -m {' '.join(part)}", flush=True)
        subprocess.run([sys.executable, "-m", *part], check=True)


if __name__ == "__main__":
    main()
