#!/usr/bin/env bash
# Runs a command with the reads of one block device throttled (cgroup v1
# blkio, needs root): emulates a slower drive on a machine whose disk is
# faster (or host-cached). Usage: benches/throttle.sh DEVICE BYTES_PER_S CMD...
# e.g. benches/throttle.sh /dev/vda 1500000000 benches/prefetch.sh DIR TRACES
set -euo pipefail
dev=${1:?device}; bps=${2:?bytes per second}; shift 2
majmin=$(printf '%d:%d' "0x$(stat -c %t "$dev")" "0x$(stat -c %T "$dev")")
cg=/sys/fs/cgroup/blkio/sluice-throttle-$$
mkdir -p "$cg"
trap 'rmdir "$cg" 2>/dev/null || true' EXIT
echo "$majmin $bps" > "$cg/blkio.throttle.read_bps_device"
echo "reads of $dev ($majmin) throttled to $bps B/s" >&2
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" "$@"
