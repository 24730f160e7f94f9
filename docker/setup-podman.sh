#!/usr/bin/env bash
# Install and configure rootful podman on a Debian host without a Docker engine,
# and build the local Debian base image used when no registry can be reached.
#
# Each step is skipped when its result already exists, so the script is safe
# to run again. Needs root and apt-get.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"

if [ "$(id -u)" -ne 0 ]; then
    echo "error: setup-podman.sh installs packages and must run as root" >&2
    exit 1
fi

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "installing podman, buildah, runc and debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q podman buildah runc debootstrap
fi

# crun, podman's default runtime, fails on some cgroup layouts, and hosts that
# forbid raising resource limits reject podman's default ulimits.
conf=/etc/containers/containers.conf
if ! grep -qs 'runtime = "runc"' "$conf"; then
    echo "writing $conf (runtime runc, fixed ulimits)"
    mkdir -p /etc/containers
    cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
fi

if ! podman image exists "$BASE_IMAGE"; then
    echo "building $BASE_IMAGE from Debian $DEBIAN_SUITE packages"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" >/dev/null
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
fi
podman --version
