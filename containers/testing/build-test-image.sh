#!/usr/bin/env bash
# Build the local test image llmbatch-test:latest without a registry: a minimal Debian bookworm
# root file system from debootstrap, imported into a container engine's image storage:
#
#   bash containers/testing/build-test-image.sh          # the Docker engine that $DOCKER_HOST names
#                                                        # (default: the private one of dockerd.sh)
#   bash containers/testing/build-test-image.sh podman   # Podman's storage, as $CONTAINERS_STORAGE_CONF
#                                                        # says (podman.sh setup calls this)
#
# The image holds no llmbatch and no venv: the tests bind the host's venv and the interpreter it
# points to read-only at the same paths, the way HPC users bind a conda env into a base image.
# Debian's python3 is included for the shared libraries any CPython build links against (libssl,
# libffi, libsqlite3, libbz2, liblzma, libuuid, libexpat, ...); torch needs libstdc++ (from apt).
#
# Idempotent: nothing to do when the image exists. The root file system is cached as a tarball
# under ${LLMBATCH_DOCKER_DIR:-/tmp/llmbatch-docker}/cache, so a rebuild is only an import, and Docker
# and Podman get the same image. The Debian mirror is the one this machine's apt uses (override:
# LLMBATCH_DEBIAN_MIRROR).
set -euo pipefail
INSTALL=$(cd "$(dirname "$0")/../../slurm" && pwd)/install.sh

ENGINE=${1:-docker}
IMAGE=${LLMBATCH_TEST_IMAGE:-llmbatch-test:latest}
SUITE=bookworm
INCLUDE=python3,ca-certificates
DIR=${LLMBATCH_DOCKER_DIR:-/tmp/llmbatch-docker}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
TARBALL=$DIR/cache/$SUITE-minbase-${INCLUDE//,/-}.tar

log() { echo "build-test-image.sh: $*" >&2; }

case $ENGINE in
    docker)
        export DOCKER_HOST=${DOCKER_HOST:-unix://$DIR/docker.sock}
        if ! docker version >/dev/null 2>&1; then
            log "no Docker engine answers at $DOCKER_HOST (start one: containers/testing/dockerd.sh start)"
            exit 1
        fi
        ;;
    podman) ;;
    *) echo "usage: $0 [docker|podman]" >&2; exit 2 ;;
esac
if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi

if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || bash "$INSTALL" debootstrap
    # The mirror apt already uses for $SUITE: one that answers, whatever the sources file format.
    mirror=${LLMBATCH_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' \
        | awk -v s="$SUITE" '$1 == s {print $2; exit}')}
    if [ -z "$mirror" ]; then
        log "no $SUITE mirror in apt's sources; set LLMBATCH_DEBIAN_MIRROR"
        exit 1
    fi
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/llmbatch-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # apt's downloaded packages are of no use in the image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    mkdir -p "$DIR/cache"
    tar --numeric-owner -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi

log "$ENGINE import $TARBALL as $IMAGE"
if [ "$ENGINE" = podman ]; then
    # Rootful `podman import` keeps a cache of blob digests in /var/lib/containers/cache, whatever the
    # storage configuration says: if that folder was not there before, it goes again.
    cache=/var/lib/containers
    [ -e "$cache" ] && cache=
fi
"$ENGINE" import "$TARBALL" "$IMAGE" >/dev/null
[ -z "${cache:-}" ] || rm -rf "$cache"
