#!/usr/bin/env bash
# The test command (README), and all that CI runs. Sets up what the tests need
# (scripts/setup-tests.sh: compilers, Chromium, the test model, the Jupyter client, the
# kernel's build cache; quick when already there), then runs, reporting every failure rather
# than stopping at the first:
#   1. the format check (cargo fmt --check)
#   2. every test binary (cargo test --workspace --no-fail-fast)
#   3. the GPU check's CPU dry run (the ops against compositions, the QLoRA benchmark, tiny model)
#   4. the CUDA path compiles (scripts/cuda-check.sh: stub nvcc for candle, real nvcc for ours)
#   5. the browser check (JupyterLab + jupyterlab_widgets in headless Chromium steer the panel)
#
#   scripts/test.sh            # all of the above
#   scripts/test.sh -- NAME    # only cargo test, with these arguments
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Two cores: build with both, keep the test binaries from fighting over them.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
# The Parquet reader that scripts/setup-tests.sh builds beside the test binaries.
export PEFT_PARQUET_READER="${PEFT_PARQUET_READER:-$CARGO_TARGET_DIR/debug/peft-parquet-rows}"

scripts/setup-tests.sh || exit 1

# Everything the tests write to a temporary directory (Rust's temp_dir, Python's tempfile,
# mktemp) lands in one directory per run, removed at the end: a machine that keeps its disk
# between runs must not fill up with what killed or failed tests left behind.
base_tmp="${TMPDIR:-/tmp}"
find "$base_tmp" -maxdepth 1 -name 'peft-test-run.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
TMPDIR="$(mktemp -d "$base_tmp/peft-test-run.XXXXXX")"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
free_mb=$(df -Pm "$TMPDIR" | awk 'NR == 2 { print $4 }')
if [ "${free_mb:-0}" -lt 8192 ]; then
  echo "scripts/test.sh: warning: only ${free_mb} MB free on $(df -P "$TMPDIR" | awk 'NR == 2 { print $6 }'); the tests write a few GB" >&2
fi

if [ "${1:-}" = "--" ]; then
  shift
  cargo test --workspace --no-fail-fast "$@"
  exit
fi

failed=()
step() {
  local name="$1"
  shift
  echo "== $name"
  local t0=$SECONDS
  if "$@"; then
    echo "== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "== $name: FAILED ($((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}
step "format" cargo fmt --all -- --check
step "tests" cargo test --workspace --no-fail-fast
step "GPU check, CPU dry run" scripts/gpu-check.sh --cpu
step "CUDA path compiles" scripts/cuda-check.sh
step "browser check" scripts/browser-check.sh
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all checks passed"
