#!/usr/bin/env bash
# The GPU matvec benchmark on another Mesa lavapipe than the system's, in a
# Debian chroot (needs root and debootstrap; downloads about 300 MB).
# Default: Mesa from Debian 13's trixie-backports (26.1.6 on 21 Nov 2026).
# Usage: benches/lavapipe-chroot.sh DIR [RUNS (default 3)] [SUITE (default
#   trixie)] [APT_TARGET (default trixie-backports; "" for the suite's own)]
#   [BENCH_ARGS ... (e.g. --only Q4_0 --rows-per-invocation 8)]
# Prints the adapter line and one JSON line per type and run.
set -euo pipefail
dir=${1:?usage: benches/lavapipe-chroot.sh DIR [RUNS] [SUITE] [APT_TARGET] [BENCH_ARGS...]}
runs=${2:-3}
suite=${3:-trixie}
target=${4-trixie-backports}
shift $(( $# < 4 ? $# : 4 ))
bin=$(cargo bench --bench gpu_matvec --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$bin" ] || { echo "could not build the gpu_matvec benchmark" >&2; exit 1; }
if [ ! -x "$dir/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase "$suite" "$dir" http://deb.debian.org/debian >&2
fi
if [ -n "$target" ]; then
  echo "deb http://deb.debian.org/debian $target main" > "$dir/etc/apt/sources.list.d/extra.list"
fi
chroot "$dir" apt-get update -q >&2
chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  ${target:+-t "$target"} mesa-vulkan-drivers libvulkan1 >&2
cp "$bin" "$dir/usr/local/bin/gpu_matvec"
mkdir -p "$dir/tmp/xdg"
for _ in $(seq "$runs"); do
  chroot "$dir" env XDG_RUNTIME_DIR=/tmp/xdg /usr/local/bin/gpu_matvec --bench "$@"
done
