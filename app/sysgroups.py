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


# Id keys (app.overrides.ID_KEYS) that take user names; the others take group
# names (or numbers only: first_valid_uid and friends).
_USER_NAME_KEYS = frozenset({"uid", "mail_uid", "system_groups_user"})
_GROUP_NAME_KEYS = frozenset({"gid", "mail_gid", "mail_access_groups", "mail_privileged_group"})


def root_name(key: str, value: str) -> str | None:
    """The name in an id override's value that is root on this host, if any.

    `uid toor` is `uid 0` where toor is an alias of root: the literal checks in
    app.overrides cannot see that, the system's user and group databases can.
    """
    base = key.lower().rsplit("/", 1)[-1]
    if base not in _USER_NAME_KEYS | _GROUP_NAME_KEYS:
        return None
    for name in (v.strip() for v in value.split(",")):
        if not name or name.isdigit():
            continue
        try:
            num = (pwd.getpwnam(name).pw_uid if base in _USER_NAME_KEYS
                   else grp.getgrnam(name).gr_gid)
        except (KeyError, ValueError):
            continue
        if num == 0:
            return name
    return None


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
