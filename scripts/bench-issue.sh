#!/usr/bin/env bash
# The issuance benchmark: builds in release mode, starts a 3-node cluster on
# loopback, makes one join token per issuance beforehand, then measures
# audited X509-SVID and JWT-SVID issuance with 64 clients, verification on a
# follower, and this machine's raw signing rate in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build -c release --product warrant 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\]' || true
swift build -c release --product warrant-bench 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\]' || true
bin="$(swift build -c release --show-bin-path)"
"$bin/warrant-bench" issue --warrant-binary "$bin/warrant" --clients 64 --seconds "${SECONDS_PER_RUN:-8}"
