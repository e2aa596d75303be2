#!/usr/bin/env bash
# Runs the read engines', budget's, cache's and formats' tests built for
# x86_64-pc-windows-gnu under Wine: the Windows engine (overlapped ReadFile,
# FILE_FLAG_NO_BUFFERING) executes, though Wine does not enforce
# NO_BUFFERING's alignment rules the way Windows does.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || [ ! -x /usr/lib/wine/wine64 ]; then
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        wine64 wine gcc-mingw-w64-x86-64 >/dev/null
fi
rustup target add x86_64-pc-windows-gnu >/dev/null

export WINEPREFIX="${WINEPREFIX:-${TMPDIR:-/tmp}/sluice-wine}" WINEDEBUG=-all
if [ ! -d "$WINEPREFIX/drive_c/windows/system32" ]; then
    /usr/lib/wine/wine64 wineboot -i >/dev/null 2>&1 || true
fi
sys32="$WINEPREFIX/drive_c/windows/system32"
if [ ! -f "$sys32/bcryptprimitives.dll" ]; then
    x86_64-w64-mingw32-gcc -shared -O2 -o "$sys32/bcryptprimitives.dll" \
        scripts/wine/bcryptprimitives.c -ladvapi32
fi

CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=/usr/lib/wine/wine64 \
    cargo test --locked --target x86_64-pc-windows-gnu \
    -p sluice-io -p sluice-stream -p sluice-cache -p sluice-format "$@"
