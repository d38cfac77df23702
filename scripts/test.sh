#!/usr/bin/env bash
# The test command: fetches the test model if it is not cached yet, then runs every test.
#
#   scripts/test.sh            # all tests
#   scripts/test.sh -- NAME    # extra arguments go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
scripts/fetch-smollm2.sh >/dev/null
cargo test --workspace "$@"
