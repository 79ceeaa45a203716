#!/usr/bin/env bash
# Stop the local Slurm cluster started by start-cluster.sh: cancel its jobs, stop its daemons
# through their pid files (SIGTERM, then SIGKILL after a timeout), and stop whatever its jobs left.
# Idempotent: nothing to do is not an error. The state folder (logs, accounting database) is kept,
# unless --purge is given.
#   usage: stop-cluster.sh [--purge]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

if [ ! -d "$DIR" ]; then
    exit 0
fi
exec 9> "$DIR/lock"
flock -w 120 9 || { echo "stop-cluster.sh: $DIR/lock is held by another process" >&2; exit 1; }

stop_all

if [ $purge = 1 ]; then
    exec 9>&-
    rm -rf "$DIR"
    log "stopped; removed $DIR"
else
    log "stopped; logs in $LOG"
fi
