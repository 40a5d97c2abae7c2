"""lastlogin: a native Dovecot post-login daemon."""

__version__ = "0.1.0"
