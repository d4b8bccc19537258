#!/usr/bin/env bash
# Install edgewatch on a gateway as a hardened systemd service (see docs/deployment.md).
#
#   sudo systemd/install.sh [--dry-run] [--wheel FILE] [--model DIR] [--no-venv] [--start]
#
# - venv in $PREFIX/venv (default /opt/edgewatch) with the gateway install: no torch, no train extra;
# - config in $CONFDIR (default /etc/edgewatch): a template is copied only if no config exists yet;
#   credentials go in $CONFDIR/credentials (0700), loaded by the unit with LoadCredential=;
# - state in /var/lib/edgewatch, created by systemd (StateDirectory=) for the service's dynamic user;
# - the unit in $UNITDIR (default /etc/systemd/system), then daemon-reload and enable.
# Idempotent: running it again upgrades the package and the unit and keeps config, credentials, state.
# DESTDIR=/some/root installs into a staging tree (no systemctl calls), e.g. for packaging or tests.
set -euo pipefail

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/edgewatch}"
CONFDIR="${CONFDIR:-/etc/edgewatch}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
PYTHON="${PYTHON:-python3}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dry_run=0
wheel=""
model=""
make_venv=1
start=0

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --wheel) wheel="${2:?--wheel needs a file}"; shift ;;
        --model) model="${2:?--model needs a bundle directory}"; shift ;;
        --no-venv) make_venv=0 ;;
        --start) start=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# Print each action; run it unless --dry-run.
run() {
    echo "+ $*"
    if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

note() { echo "# $*"; }

venv="$DESTDIR$PREFIX/venv"
conf="$DESTDIR$CONFDIR"
unit="$DESTDIR$UNITDIR/edgewatch.service"

if [[ -z "$DESTDIR" && $dry_run -eq 0 && $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (or use --dry-run, or DESTDIR=... for a staging tree)" >&2
    exit 1
fi

# 1. The Python environment.
if [[ $make_venv -eq 1 ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: $PYTHON must be Python >= 3.11 (set PYTHON=...)" >&2
        exit 1
    fi
    if [[ -x "$venv/bin/python" ]]; then
        note "venv $venv exists: upgrading the package in place"
    else
        run "$PYTHON" -m venv "$venv"
        run "$venv/bin/python" -m pip install --quiet --upgrade pip
    fi
    # The gateway install: the package without extras (no torch, no scikit-learn).
    run "$venv/bin/python" -m pip install --quiet --upgrade "${wheel:-$SRC}"
else
    note "--no-venv: skipping the Python environment"
fi

# 2. Docs next to the install (the unit's Documentation= points here).
run install -d -m 0755 "$DESTDIR$PREFIX/docs"
for doc in deployment.md mqtt.md configuration.md; do
    if [[ -f "$SRC/docs/$doc" ]]; then
        run install -m 0644 "$SRC/docs/$doc" "$DESTDIR$PREFIX/docs/$doc"
    fi
done

# 3. Configuration: never overwrite an existing file.
run install -d -m 0755 "$conf"
if [[ -e "$conf/edgewatch.toml" ]]; then
    note "$conf/edgewatch.toml exists: kept"
else
    template=""
    for candidate in "$SRC/examples/gateway.toml" "$SRC"/examples/*.toml; do
        if [[ -f "$candidate" ]]; then template="$candidate"; break; fi
    done
    if [[ -n "$template" ]]; then
        run install -m 0644 "$template" "$conf/edgewatch.toml"
        note "edit $CONFDIR/edgewatch.toml (gateway id, serial port, broker), then: edgewatch config check"
    else
        note "no template found: write $CONFDIR/edgewatch.toml (see docs/configuration.md)"
    fi
fi
if [[ -n "$model" ]]; then
    if [[ ! -f "$model/manifest.json" ]]; then
        echo "install.sh: $model is not a model bundle (no manifest.json)" >&2
        exit 1
    fi
    run install -d -m 0755 "$conf/model"
    run cp -r "$model/." "$conf/model/"
    note "model bundle copied to $CONFDIR/model (point [model] path there)"
fi

# 4. Credentials: root-only directory. LoadCredential= needs the files to exist, so empty placeholders
#    are created; an empty credential is never read unless the config names it.
run install -d -m 0700 "$conf/credentials"
for cred in mqtt-password mqtt-tls-key; do
    if [[ ! -e "$conf/credentials/$cred" ]]; then
        run install -m 0600 /dev/null "$conf/credentials/$cred"
    fi
done

# 5. The unit, with the paths of this install.
run install -d -m 0755 "$DESTDIR$UNITDIR"
if [[ $dry_run -eq 1 ]]; then
    echo "+ sed (PREFIX=$PREFIX, CONFDIR=$CONFDIR) $SRC/systemd/edgewatch.service > $unit"
else
    tmp="$(mktemp)"
    sed -e "s#/opt/edgewatch#$PREFIX#g" -e "s#/etc/edgewatch#$CONFDIR#g" "$SRC/systemd/edgewatch.service" >"$tmp"
    install -m 0644 "$tmp" "$unit"
    rm -f "$tmp"
fi

# 6. Enable (not in a staging tree).
if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
    run systemctl enable edgewatch.service
    if [[ $start -eq 1 ]]; then
        run systemctl restart edgewatch.service
    else
        note "start with: systemctl start edgewatch   (logs: journalctl -u edgewatch -f)"
    fi
else
    note "staging tree or no systemctl: not enabling the unit"
fi
note "state: /var/lib/edgewatch (created by systemd on first start)"
