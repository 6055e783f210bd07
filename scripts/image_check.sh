#!/usr/bin/env bash
# The image check (scripts/image_check.py; docs/deploy.md, "The image check"): builds every
# target of docker/Dockerfile with podman and runs each image as go-livepeer does, in CPU tiny
# mode. Needs no Docker daemon and no registry but Debian's mirror and PyPI.
#
#   scripts/image_check.sh                       # all five targets, then compose
#   scripts/image_check.sh --targets llm --no-compose
#
# What it needs and installs when missing (as root, from Debian's packages): podman, buildah,
# runc, mmdebstrap and the container plumbing they use. The project's .venv (`make install`)
# runs the checks: they send each pipeline's own sample request and read openapi.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(podman buildah runc mmdebstrap uidmap fuse-overlayfs slirp4netns)
missing=()
for tool in podman buildah runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "image_check: ${missing[*]} missing; install ${packages[*]} (Debian/Ubuntu packages)" >&2
    exit 2
  fi
  echo "image_check: installing ${packages[*]} from Debian's packages" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "${packages[@]}" >/dev/null
fi

exec "${VENV:-.venv}/bin/python" scripts/image_check.py "$@"
