#!/usr/bin/env python3
"""notify_command example: tell a user about a login from a new country.

lastlogin runs this without a shell, once per login flagged new_location,
with one JSON object on stdin (docs/geoip.md). It must finish within
notify_timeout; a non-zero exit is logged and counted, never retried.

Two ways, pick with the first argument:

    notify-new-location.py mail      # mail the user via the local sendmail
    notify-new-location.py webhook URL   # POST the JSON to URL (chat, SIEM...)

Only the standard library; run it by hand to try it:

    echo '{"username": "alice@example.org", "protocol": "imap", "remote_ip": "192.0.2.7",
           "country": "AT", "asn": 8447, "occurred_at": "2026-11-26T15:00:00+00:00",
           "previous_countries": ["DE"]}' | ./notify-new-location.py mail
"""

import json
import subprocess
import sys
import urllib.request
from email.message import EmailMessage

SENDMAIL = ["/usr/sbin/sendmail", "-t", "-oi"]
FROM = "postmaster@example.org"         # change: the sender your users trust


def mail(event: dict) -> None:
    user = event["username"]
    if "@" not in user:
        return                          # not an address: nothing to mail to
    seen = ", ".join(event.get("previous_countries") or []) or "none recorded"
    msg = EmailMessage()
    msg["From"] = FROM
    msg["To"] = user
    msg["Subject"] = f"New sign-in to your mailbox from {event.get('country') or 'a new network'}"
    msg.set_content(
        f"Your mailbox {user} was opened over {event['protocol'].upper()} at "
        f"{event['occurred_at']} from {event.get('remote_ip') or 'an unrecorded address'} "
        f"(country {event.get('country') or 'unknown'}, network AS{event.get('asn')}).\n\n"
        f"Countries you signed in from before: {seen}.\n\n"
        "If this was not you, change your password now and tell us.\n")
    subprocess.run(SENDMAIL, input=msg.as_bytes(), check=True, timeout=20)


def webhook(event: dict, url: str) -> None:
    req = urllib.request.Request(url, data=json.dumps(event).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=8) as resp:
        resp.read()


def main() -> int:
    event = json.load(sys.stdin)
    how = sys.argv[1] if len(sys.argv) > 1 else "mail"
    if how == "webhook":
        webhook(event, sys.argv[2])
    else:
        mail(event)
    return 0


if __name__ == "__main__":
    sys.exit(main())
