#!/bin/sh
# Render the shared Dovecot config for the demo stack and run Dovecot in the
# foreground. DEMO_USERS: "user:password ..." (passwd-file users, uid vmail).
set -eu
BASE=/srv/dovecot
install -d -m 0755 "$BASE" "$BASE/run" "$BASE/state"
install -d -o vmail -g vmail -m 0755 "$BASE/home"
sed -e "s|@BASE@|$BASE|g" -e "s|@SOCKET_DIR@|/run/lastlogin|g" \
    -e "s|@IMAP_PORT@|143|g" -e "s|@POP3_PORT@|110|g" -e "s|@MAIL_UID@|5000|g" \
    -e "s|@LISTEN@|*|g" -e "s|@EXTRA@|log_path = /dev/stderr|g" \
    /etc/lastlogin/dovecot.conf.in > "$BASE/dovecot.conf"
: > "$BASE/passwd"
for entry in ${DEMO_USERS:-alice@example.com:secret bob@example.com:secret}; do
    user=${entry%%:*}; pass=${entry#*:}
    echo "$user:{PLAIN}$pass:5000:5000::$BASE/home/$user::" >> "$BASE/passwd"
done
chown root:dovecot "$BASE/passwd"; chmod 0640 "$BASE/passwd"
exec dovecot -F -c "$BASE/dovecot.conf"
