#!/usr/bin/env bash
# The test command. Sets up what the tests need (scripts/setup-tests.sh: the test model, the
# Jupyter client, the kernel's build cache; quick when already there), then runs every test
# binary, reporting every failure rather than stopping at the first failing binary.
#
#   scripts/test.sh            # all tests
#   scripts/test.sh -- NAME    # extra arguments go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
scripts/setup-tests.sh
cargo test --workspace --no-fail-fast "$@"
