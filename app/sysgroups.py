"""The system's group membership of a login user (for acl_groups).

NSS lookups can be slow (LDAP, SSSD): they run on a worker thread and are
cached for a while, so a login does not wait on them twice.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import time


def system_groups(username: str) -> list[str]:
    """Names of the groups ``username`` belongs to; [] if no such system user."""
    try:
        pw = pwd.getpwnam(username)
    except (KeyError, ValueError):
        return []
    names = []
    for gid in os.getgrouplist(username, pw.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return names


class GroupCache:
    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def groups(self, username: str) -> list[str]:
        now = time.monotonic()
        hit = self._cache.get(username)
        if hit and hit[0] > now:
            return hit[1]
        names = await asyncio.get_running_loop().run_in_executor(None, system_groups, username)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[username] = (now + self.ttl, names)
        return names
