#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for building and testing Warrant.
# Safe to run again: it installs only what is missing. Sourced by run.sh and
# test.sh; may also be run on its own.
set -euo pipefail

# libgoogle-perftools-dev: tcmalloc, the allocator the warrant binary links
# (glibc's malloc and free were ~10% of a leader's CPU under issuance load).
apt_packages=(libsqlite3-dev libssl-dev openssl faketime libgoogle-perftools-dev)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "setup: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v swift >/dev/null 2>&1; then
  if [ -x /opt/swift/usr/bin/swift ]; then
    export PATH="/opt/swift/usr/bin:$PATH"
  else
    echo "setup: Swift 6.1 or newer is needed and was not found on PATH or in /opt/swift." >&2
    echo "setup: install a Swift toolchain for Linux, then run this again." >&2
    exit 1
  fi
fi

# Python's cryptography and PyJWT, for the interoperability tests: pip into
# the Python on PATH when it allows it, else Debian's packages.
if ! python3 -c 'import cryptography, jwt' >/dev/null 2>&1; then
  echo "setup: installing Python cryptography and PyJWT"
  if ! python3 -m pip install --quiet cryptography pyjwt >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-cryptography python3-jwt >/dev/null
  fi
fi

# py-spiffe and grpcio, for the Workload API interoperability test (PyPI
# only; Debian's Python may need --break-system-packages for a user-level tool).
if ! python3 -c 'import spiffe, grpc' >/dev/null 2>&1; then
  echo "setup: installing Python spiffe and grpcio"
  python3 -m pip install --quiet spiffe grpcio >/dev/null 2>&1 \
    || python3 -m pip install --quiet --break-system-packages spiffe grpcio >/dev/null 2>&1 \
    || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null;
         python3 -m pip install --quiet --break-system-packages spiffe grpcio >/dev/null; }
fi
