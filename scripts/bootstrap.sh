# Sourced by scripts/serve and scripts/test: a virtualenv in .venv with the
# project installed (editable), rebuilt only when pyproject.toml changes.
# $1: the pip extra to install ("" or "test").
set -euo pipefail

bootstrap_venv() {
    local extra="${1:-}" spec="." stamp
    [ -n "$extra" ] && spec=".[$extra]"
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "lastlogin needs Python 3.11 or newer as python3" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv 2>/dev/null || {
            apt_install python3-venv
            python3 -m venv .venv
        }
    fi
    stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${extra:-base}"
    if [ ! -e "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e "$spec"
        touch "$stamp"
    fi
}

# apt_install PKG...: install Debian packages (root only; says what to do otherwise).
apt_install() {
    [ $# -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "missing Debian packages: $* (run: sudo apt-get install -y $*)" >&2
        exit 1
    fi
    echo "installing Debian packages: $*" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
