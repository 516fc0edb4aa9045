#!/usr/bin/env bash
# The issuance benchmark: builds in release mode, starts a 3-node cluster on
# loopback, makes one join token per issuance beforehand, then measures
# audited X509-SVID and JWT-SVID issuance with 64 clients, verification on a
# follower, and this machine's raw signing rate in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# wrk is the load generator (the benchmark falls back to its Swift client without it).
command -v wrk >/dev/null 2>&1 || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
source scripts/release-build.sh
"$bin/warrant-bench" issue --warrant-binary "$bin/warrant" --clients 64 --seconds "${SECONDS_PER_RUN:-8}"
