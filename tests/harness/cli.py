"""The `lastlogin` command as a real process, with a clean environment.

Only the LASTLOGIN_* settings a test passes reach the command: the caller's
own environment (a developer's LASTLOGIN_DATABASE_URL) never leaks in.
"""

from __future__ import annotations

import os
import subprocess
import sys


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    full.update(env or {})
    return full


def lastlogin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``lastlogin *args`` to the end; text stdout/stderr captured."""
    return subprocess.run([sys.executable, "-m", "app", *args], env=cli_env(env),
                          capture_output=True, text=True, timeout=60)


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``lastlogin *args`` without waiting (for commands run side by side)."""
    return subprocess.Popen([sys.executable, "-m", "app", *args], env=cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
