#!/usr/bin/env bash
# Idempotent developer/CI setup for a Debian 12 machine:
#   1. Debian packages for the real-server tests, demo and bench (apt-get, root only);
#   2. .venv with `pip install -e '.[test]'` (redone only when setup.py changes).
# PYTHON (from `make setup PYTHON=pypy3`) picks the interpreter; a non-default one gets its own
# venv (VENV, .venv-pypy3 for pypy3) so the CPython .venv that `make test` uses stays as it is.
set -euo pipefail

cd "$(dirname "$0")/.."

PACKAGES=(postgresql mariadb-server mariadb-client pgbouncer sysbench python3-venv chromium chromium-driver)
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
PIP_EXTRA=()
case "$(basename "$PYTHON")" in
    pypy3*)
        # Debian's PyPy 7.3 (Python 3.9).  Packages built in Rust publish PyPy 3.9 wheels only up to
        # some release, and building them here needs a Rust toolchain and the crates index, so
        # pip must take a wheel (it falls back to the newest release that has one);
        # scripts/pypy-constraints.txt caps the ones whose dependants would otherwise ask for more.
        PACKAGES+=(pypy3 pypy3-venv pypy3-dev)  # -dev: headers for C extensions without PyPy wheels
        PIP_EXTRA=(--only-binary=cryptography,pydantic-core,rpds-py -c scripts/pypy-constraints.txt)
        ;;
esac
STAMP="$VENV/.setup-stamp"

log() { printf 'setup: %s\n' "$*" >&2; }

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing_packages() {
    local pkg
    if ! command -v dpkg-query >/dev/null 2>&1; then
        return 0  # not Debian: nothing we can check or install; tests skip/fail on binaries
    fi
    for pkg in "${PACKAGES[@]}"; do
        package_installed "$pkg" || printf '%s\n' "$pkg"
    done
}

stop_system_services() {
    # Package postinst scripts may start system services (mariadb on 3306,
    # pgbouncer on 6432); our servers run in temp dirs and need no system ones.
    local svc
    for svc in "$@"; do
        service "$svc" stop >/dev/null 2>&1 || true
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable "$svc" >/dev/null 2>&1 || true
        else
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
}

install_packages() {
    mapfile -t missing < <(missing_packages)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]}"
        log "install them as root:  sudo apt-get install -y ${missing[*]}"
        exit 1
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! apt-get install "${apt_opts[@]}" "${missing[@]}"; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q
        apt-get install "${apt_opts[@]}" "${missing[@]}"
    fi
    local services=()
    [[ " ${missing[*]} " == *" mariadb-server "* ]] && services+=(mariadb)
    [[ " ${missing[*]} " == *" pgbouncer "* ]] && services+=(pgbouncer)
    [ "${#services[@]}" -eq 0 ] || stop_system_services "${services[@]}"
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
        rm -f "$STAMP"
    fi
    if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/setup.sh ] \
            && { [ "${#PIP_EXTRA[@]}" -eq 0 ] || [ "$STAMP" -nt scripts/pypy-constraints.txt ]; }; then
        return 0
    fi
    log "installing txrdsproxy[test] into $VENV"
    "$VENV/bin/python" -m pip install -q "${PIP_EXTRA[@]}" -e '.[test]' --config-settings editable_mode=compat
    touch "$STAMP"
}

install_packages
setup_venv
