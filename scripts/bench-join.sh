#!/usr/bin/env bash
# The attested-join benchmark: builds in release mode, starts a 3-node
# cluster and a local OIDC provider (HTTPS) on loopback, configures a GitHub
# issuer and one join rule, mints one RS256 token per join beforehand, then
# measures token -> join -> X509-SVID with 64 clients, counting the JWKS
# fetches (none are expected: the keys are cached on each node).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# wrk is the load generator (the benchmark falls back to its Swift client without it).
command -v wrk >/dev/null 2>&1 || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
source scripts/release-build.sh
"$bin/warrant-bench" join --warrant-binary "$bin/warrant" --clients 64 --seconds "${SECONDS_PER_RUN:-5}"
