#!/usr/bin/env bash
# Build the local job image (a minimal Debian with python3) when it is missing.
#
# For machines that cannot pull from a registry: debootstrap a minbase root with
# python3 from the machine's own apt mirror, then `docker import` it. On a real cluster
# use a pinned CUDA/PyTorch image from your registry instead (see docs/design.md) and
# name it in inventory.yaml.
#
#   scripts/build-job-image.sh [IMAGE]      (default gpujobq-job:bookworm)
set -euo pipefail
IMAGE=${1:-gpujobq-job:bookworm}
SUITE=${GPUJOBQ_IMAGE_SUITE:-bookworm}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "job image $IMAGE is present"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

# The first Debian archive this machine's apt is configured with (never written here).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
    echo "no Debian mirror found in /etc/apt/sources.list(.d); cannot build $IMAGE" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "building $IMAGE: debootstrap $SUITE (minbase + python3)..."
debootstrap --variant=minbase --include=python3 "$SUITE" "$root/fs" "$mirror" >"$root/log" 2>&1 \
    || { tail -20 "$root/log" >&2; exit 1; }
rm -rf "$root/fs/var/cache/apt/archives/"*.deb "$root/fs/var/lib/apt/lists/"*
tar -C "$root/fs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "job image $IMAGE built"
