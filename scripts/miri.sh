#!/usr/bin/env bash
# Miri over the crates that do no I/O: undefined behaviour (out-of-bounds or
# misaligned accesses, use after free, invalid values, aliasing violations)
# in sluice's own code and in what its tests drive of its dependencies.
#
#   scripts/miri.sh              # all four
#   scripts/miri.sh sluice-core  # one crate
#
# Needs the nightly toolchain with the miri component
# (`rustup +nightly component add miri`). Miri interprets every step, about a
# thousand times slower than a debug build, so property tests run few cases
# (PROPTEST_CASES, default 4) and the heavier tests shrink their inputs under
# cfg(miri); tests that read recorded traces from disk are ignored under
# Miri (see `cfg_attr(miri, ignore)`). Isolation is disabled so that
# proptest can read its environment and look for regression files.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-4}"
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"

crates=("$@")
if [ ${#crates[@]} -eq 0 ]; then
    crates=(sluice-core sluice-cache sluice-trace sluice-format)
fi
for c in "${crates[@]}"; do
    echo "== miri: $c"
    start=$SECONDS
    case "$c" in
        # Only the GGUF header parser works on bytes in memory; the rest of
        # the crate opens and maps files, which Miri cannot map.
        sluice-format) cargo +nightly miri test -p sluice-format --lib -- gguf::tests ;;
        *) cargo +nightly miri test -p "$c" ;;
    esac
    echo "== miri: $c: $((SECONDS - start)) s"
done
