#!/usr/bin/env bash
# Remove the edgewatch service installed by systemd/install.sh.
#
#   sudo systemd/uninstall.sh [--dry-run] [--purge]
#
# Stops and disables the unit, removes it and $PREFIX (venv, docs). Configuration, credentials and
# state (the SQLite database with unsent alerts) are KEPT unless --purge is given.
# Honours the same DESTDIR, PREFIX, CONFDIR, UNITDIR as install.sh.
set -euo pipefail

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/edgewatch}"
CONFDIR="${CONFDIR:-/etc/edgewatch}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
STATEDIR="${STATEDIR:-/var/lib/edgewatch}"

dry_run=0
purge=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {
    echo "+ $*"
    if [[ $dry_run -eq 0 ]]; then "$@"; fi
}
note() { echo "# $*"; }

if [[ -z "$DESTDIR" && $dry_run -eq 0 && $(id -u) -ne 0 ]]; then
    echo "uninstall.sh: run as root (or use --dry-run)" >&2
    exit 1
fi

if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null 2>&1; then
    # The service publishes its offline status and flushes the outbox on stop.
    run systemctl disable --now edgewatch.service || true
fi
run rm -f "$DESTDIR$UNITDIR/edgewatch.service"
run rm -rf "$DESTDIR$UNITDIR/edgewatch.service.d"
if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
fi
run rm -rf "$DESTDIR$PREFIX"

if [[ $purge -eq 1 ]]; then
    run rm -rf "$DESTDIR$CONFDIR"
    # With DynamicUser=yes systemd keeps the data in /var/lib/private and links it from /var/lib.
    run rm -rf "$DESTDIR$STATEDIR" "$DESTDIR$(dirname "$STATEDIR")/private/$(basename "$STATEDIR")"
else
    note "kept: $CONFDIR (config, credentials) and $STATEDIR (database); --purge removes them"
fi
