"""The read-only dashboard served by `lastlogin web` (docs/web.md).

``app`` builds the Starlette application; ``auth`` the token and its
session cookie; ``views`` what each page shows (the same data as its JSON
twin); ``chart`` the server-rendered SVG.
"""
