# lastlogin: the daemon and its command line, on a slim Python base.
FROM python:3.11-slim-bookworm

RUN groupadd --system lastlogin \
 && useradd --system --gid lastlogin --home-dir /var/lib/lastlogin --shell /usr/sbin/nologin lastlogin \
 && install -d -o lastlogin -g lastlogin -m 0700 /var/lib/lastlogin \
 && install -d -o lastlogin -g lastlogin -m 0700 /run/lastlogin

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-cache-dir . && rm -rf /src

# Not root; lastlogin refuses directories another user owns or can write
# to, so the volumes keep these owners and modes (Docker copies them into a
# new named volume). Dovecot's mail processes connect as root.
USER lastlogin
ENV LASTLOGIN_DATA_DIR=/var/lib/lastlogin \
    LASTLOGIN_SOCKET_DIR=/run/lastlogin
VOLUME ["/var/lib/lastlogin", "/run/lastlogin"]
ENTRYPOINT ["lastlogin"]
CMD ["serve"]
