#!/usr/bin/env bash
# Rootful Podman for the container tests, every file it writes under one folder (Podman has no daemon).
#
#   eval "$(bash containers/testing/podman.sh setup DIR)"  # prints: export CONTAINERS_CONF=... (two lines)
#   bash containers/testing/podman.sh teardown DIR
#
# `setup` installs Debian's podman (4.3), runc and catatonit if they are missing (root), writes
# DIR/containers.conf and DIR/storage.conf, and imports the test image (build-test-image.sh podman).
# With the two variables it prints, podman keeps its image store (vfs), run root, temporary files,
# network configuration and event log under DIR, and leaves /var/lib/containers and /etc alone.
# `teardown` removes DIR (no container outlives a test: llmbatch runs them with --rm).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
INSTALL=$HERE/../../slurm/install.sh

log() { echo "podman.sh: $*" >&2; }

setup() {
    local dir=$1
    mkdir -p "$dir/tmp"
    # catatonit: `podman run --init` (a Recommends, which install.sh leaves out). runc: crun fails here.
    bash "$INSTALL" podman runc catatonit
    # runc, not crun (crun fails on these machines); runc needs explicit ulimits (podman's default
    # asks for more open files than the hard limit here). cgroupfs and a file event log: there may be
    # no systemd or journald. tmp_dir, static_dir, volume_path, network_config_dir, image_copy_tmp_dir:
    # their defaults lie under /run, /var and /etc.
    cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[network]
network_config_dir = "$dir/net.d"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/events.log"
image_copy_tmp_dir = "$dir/tmp"
tmp_dir = "$dir/libpod"
static_dir = "$dir/storage/libpod"
volume_path = "$dir/storage/volumes"
CONF
    # vfs: plain copies, no overlay mounts to leave behind (and no kernel or fuse support needed).
    cat >"$dir/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$dir/storage"
runroot = "$dir/runroot"
CONF
    export CONTAINERS_CONF=$dir/containers.conf CONTAINERS_STORAGE_CONF=$dir/storage.conf
    podman info >/dev/null 2>"$dir/info.log" || { log "podman info failed:"; cat "$dir/info.log" >&2; exit 1; }
    bash "$HERE/build-test-image.sh" podman
    echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
    echo "export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
}

teardown() {
    local dir=$1
    [ -e "$dir" ] || return 0
    # Only a folder that setup made (or began to make): it holds its tmp/ folder.
    [ -d "$dir/tmp" ] || { log "$dir was not made by setup: not removing it"; exit 1; }
    # A mount left under DIR (none is expected with vfs) would make rm fail or reach elsewhere.
    if awk -v d="$dir/" 'index($5, d) == 1 {found = 1} END {exit !found}' /proc/self/mountinfo; then
        log "something is still mounted under $dir: not removing it"
        exit 1
    fi
    rm -rf "$dir"
}

case ${1:-} in
    setup | teardown)
        [ $# -eq 2 ] || { echo "usage: $0 setup|teardown DIR" >&2; exit 2; }
        case $2 in /*) ;; *) echo "podman.sh: DIR must be absolute: $2" >&2; exit 2 ;; esac
        "$1" "$2"
        ;;
    *) echo "usage: $0 setup|teardown DIR" >&2; exit 2 ;;
esac
