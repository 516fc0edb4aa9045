#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test (unit and
# scenario tests, the 400-seed simulator run, and the planted-bug checks),
# then the quick chaos scenario (real processes, injected faults, checked
# histories; under 3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build --build-tests
swift test --skip-build
chaos/run --quick --report "${TMPDIR:-/tmp}/warrant-chaos-quick"
