#!/usr/bin/env bash
# The whole test suite on a fresh Debian/Ubuntu machine: installs what the tests need
# (Debian packages, a virtualenv with the test extras), then ruff, mypy --strict and pytest.
# Namespace and Postfix tests need root; run as root, or with sudo available.
# Extra arguments go to pytest, e.g. scripts/test.sh -k postfix
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
[ -x /usr/sbin/postfix ] || need+=(postfix)
command -v ip >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v script >/dev/null || need+=(bsdutils)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v setpriv >/dev/null || need+=(util-linux)
# tests/test_image.py: podman builds and runs the image (with runc: see tests/podman.py), on a
# base image made from a debootstrapped root.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v newuidmap >/dev/null || need+=(uidmap)
# the Debian roots (cached): sid for the real Exim ODMR provider of the interop tests,
# bookworm for the image's stand-in base
command -v debootstrap >/dev/null || need+=(debootstrap)
# tests/test_systemd_e2e.py: Debian's systemd as PID 1 in systemd-nspawn (a bookworm root),
# entered with nsenter (util-linux, above).
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
# tests/deploy/test_manpages.py: the man pages render with `man -l` and `groff -ww` finds no warning.
command -v man >/dev/null || need+=(man-db)
command -v groff >/dev/null || need+=(groff-base)
# tests/link/test_wan_clients.py: the real WAN clients (the -base packages start no service).
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v dhclient >/dev/null || need+=(isc-dhcp-client)
command -v dhcpcd >/dev/null || need+=(dhcpcd-base)
command -v udhcpc >/dev/null || need+=(udhcpc)
command -v radvd >/dev/null || need+=(radvd)
if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    # Postfix must not ask questions nor start a system instance of its own.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== installing etrnd with test extras"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# tests/test_metrics.py: Debian's Prometheus server and promtool, unpacked (not installed: no
# service, no user) into the test cache once; a bare machine gets them here.
$SUDO .venv/bin/python -m tests.support.promlab

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
$SUDO .venv/bin/python -m pytest "$@"
