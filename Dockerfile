# lastlogin: the daemon and its command line, on a slim Python base.
FROM python:3.11-slim-bookworm

RUN groupadd --system lastlogin \
 && useradd --system --gid lastlogin --home-dir /var/lib/lastlogin --shell /usr/sbin/nologin lastlogin \
 && install -d -o lastlogin -g lastlogin -m 0750 /var/lib/lastlogin \
 && install -d -o lastlogin -g lastlogin -m 0755 /run/lastlogin

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-cache-dir . && rm -rf /src

USER lastlogin
ENV LASTLOGIN_DATA_DIR=/var/lib/lastlogin \
    LASTLOGIN_SOCKET_DIR=/run/lastlogin
VOLUME ["/var/lib/lastlogin", "/run/lastlogin"]
ENTRYPOINT ["lastlogin"]
CMD ["serve"]
