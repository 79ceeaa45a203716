#!/usr/bin/env bash
# Install Debian packages that are missing (root, Debian 12):
#
#   bash slurm/install.sh               # the local Slurm cluster's packages (below)
#   bash slurm/install.sh PACKAGE...    # those packages instead (the container tests use this)
#
# Idempotent and quiet: does nothing (in well under a second) when all are already there, and runs
# `apt-get update` only when something is missing. Never starts the packages' system services.
set -euo pipefail

PACKAGES=(
    slurm-wlm       # slurmctld, slurmd and the client commands
    slurmdbd        # accounting daemon, so that sacct works
    munge           # authentication between the Slurm daemons and commands
    mariadb-server  # database behind slurmdbd
    mariadb-client  # `mariadb` client, used once to create slurmdbd's database user
)
[ $# -eq 0 ] || PACKAGES=("$@")

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = installed ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
fi

# The packages' maintainer scripts would start the system services (munge, mariadb, slurm*).
# start-cluster.sh runs its own private instances, so forbid that while installing, unless a
# policy already does so (Debian container images usually ship one that exits 101).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

echo "install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
out=$(mktemp)
# Another script may be installing packages at the same time: wait for dpkg's lock.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
if ! { apt_get update -qq && apt_get install -y -qq --no-install-recommends "${missing[@]}"; } \
        > "$out" 2>&1; then
    tail -n 30 "$out" >&2
    rm -f "$out"
    echo "install.sh: apt-get failed" >&2
    exit 1
fi
rm -f "$out"
