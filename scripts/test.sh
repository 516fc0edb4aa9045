#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test (unit and
# scenario tests, the 400-seed simulator run, and the planted-bug checks).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build --build-tests
swift test --skip-build
