#!/usr/bin/env bash
# Keeps the build cache from growing without bound on a machine that keeps it between runs (CI's
# does): every edit of a test leaves its old binary (about 100 MB each here) and its old
# incremental session behind, and after a few dozen runs the disk fills (a CI run failed on
# ENOSPC while the notebook saved its merged model). For each test binary, example and
# incremental directory, only the newest of its name is kept; cargo rebuilds whatever it needs.
#
#   scripts/prune-build-cache.sh [TARGET_DIR]   # default: $CARGO_TARGET_DIR or ~/.cache/peft-target
set -euo pipefail
target="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/peft-target}}"
[ -d "$target" ] || exit 0

# Prints every path of a group but the newest. Input lines: "mtime<TAB>group<TAB>path".
all_but_newest() {
  sort -t$'\t' -k2,2 -k1,1nr | awk -F'\t' 'seen[$2]++ { print $3 }'
}

freed=0
remove() {
  while IFS= read -r path; do
    [ -n "$path" ] || continue
    size=$(du -sk "$path" 2>/dev/null | cut -f1 || echo 0)
    rm -rf -- "$path" && freed=$((freed + size))
  done
}

for profile in "$target"/debug "$target"/release; do
  [ -d "$profile" ] || continue
  # Test binaries and examples: executables named NAME-HASH (no extension).
  for dir in "$profile/deps" "$profile/examples"; do
    [ -d "$dir" ] || continue
    remove < <(find "$dir" -maxdepth 1 -type f -perm -u+x -regextype posix-extended \
      -regex '.*/[A-Za-z0-9_]+-[0-9a-f]{16}' -printf '%T@\t%f\t%p\n' |
      sed -E 's/^([^\t]*)\t([A-Za-z0-9_]+)-[0-9a-f]{16}\t/\1\t\2\t/' | all_but_newest)
  done
  # Incremental state: one directory per crate and hash.
  if [ -d "$profile/incremental" ]; then
    remove < <(find "$profile/incremental" -mindepth 1 -maxdepth 1 -type d -printf '%T@\t%f\t%p\n' |
      sed -E 's/^([^\t]*)\t(.+)-[0-9a-z]+\t/\1\t\2\t/' | all_but_newest)
  fi
done
if [ "$freed" -gt 0 ]; then
  echo "prune-build-cache: freed $((freed / 1024)) MB of stale binaries and incremental state in $target"
fi
