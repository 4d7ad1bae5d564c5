#!/usr/bin/env bash
# Build deploy/Containerfile with buildah (rootless-friendly settings: chroot isolation, vfs storage)
# and run `dpiguard config check` in the image. Used by .ci/run; exits non-zero, with the reason on one
# line, when the image cannot be built on this machine (e.g. no access to the base image's registry).
# On the development/CI machine kind the base image's registry (docker.io) is not reachable, so the
# steps after the pull have not run there yet; the install steps themselves are tested by
# tests/test_production_install.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=vfs
if ! command -v buildah >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah) >/dev/null 2>&1 \
            || { echo "container image: buildah could not be installed with apt-get"; exit 1; }
    else
        echo "container image: no buildah (install it: apt-get install buildah)"; exit 1
    fi
fi
# The builder itself: a scratch image, committed and removed.
probe=$(buildah --storage-driver vfs from scratch 2>&1) || { echo "container image: buildah does not run here: $probe"; exit 1; }
buildah --storage-driver vfs rm "$probe" >/dev/null 2>&1
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' deploy/Containerfile | head -1)
if ! out=$(buildah --storage-driver vfs pull --quiet "$base" 2>&1); then
    echo "container image: buildah works, but the base image $base cannot be pulled: $(echo "$out" | tail -1)"
    exit 1
fi
tag=localhost/dpiguard:ci
if ! out=$(buildah --storage-driver vfs bud --isolation chroot --layers=false -f deploy/Containerfile -t "$tag" . 2>&1); then
    echo "container image: build failed: $(echo "$out" | tail -3 | tr '\n' ' ')"
    exit 1
fi
ctr=$(buildah --storage-driver vfs from "$tag")
trap 'buildah --storage-driver vfs rm "$ctr" >/dev/null 2>&1' EXIT
buildah --storage-driver vfs run --isolation chroot "$ctr" -- dpiguard --help >/dev/null \
    && buildah --storage-driver vfs run --isolation chroot --env DPIGUARD_POLICIES__DIR=/opt/dpiguard/policies "$ctr" -- \
        sh -c 'cp /opt/dpiguard/dpiguard.example.yaml /tmp/c.yaml && dpiguard keys init --config /tmp/c.yaml >/dev/null && dpiguard config check --config /tmp/c.yaml' \
    && echo "container image: built ($tag) and 'dpiguard config check' passed inside it"
