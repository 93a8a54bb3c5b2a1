#!/usr/bin/env bash
# Makes this machine able to build and run the gradserve image with podman, doing only what is
# missing (safe to run again): installs podman, runc and mmdebstrap from Debian's packages, and
# builds the local base image BASE (default localhost/debian-python:bookworm) from Debian
# packages when no registry image can be pulled. Podman's settings come from containers.conf
# beside this script (the Makefile exports CONTAINERS_CONF).
set -euo pipefail

BASE="${1:-localhost/debian-python:bookworm}"
WORK="${2:-build/image}"

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi

missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi

case "$BASE" in
  localhost/debian-python:*) ;;
  *) exit 0 ;;  # a registry image: podman build pulls it
esac
if podman image exists "$BASE"; then
  exit 0
fi
suite="${BASE##*:}"
mkdir -p "$WORK"
rootfs="$WORK/rootfs-$suite.tar"
echo "building base image $BASE from Debian $suite packages (mmdebstrap)"
$SUDO mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs"
podman import "$rootfs" "$BASE" >/dev/null
rm -f "$rootfs"
echo "imported $BASE"
