#!/usr/bin/env bash
# Runs experiments.train on this machine: one process, or N processes forming one
# jax.distributed job over localhost (CPU collectives through gloo). Rerunning the
# same command resumes from the latest checkpoint in --workdir.
#
#   bash launch/local.sh [options] -- <experiments.train flags>
#
# Options:
#   --num_processes=N   processes (default 1); process 0 prints to this terminal,
#                       process i > 0 to <log_dir>/process_<i>.log
#   --cpu_devices=D     fake CPU devices per process (XLA_FLAGS; default: real devices)
#   --parallel=MODE     adds --config.parallel=MODE (none|jit|pmap; default: jit when
#                       N > 1 or D > 1, else the config's)
#   --port=P            coordinator port on 127.0.0.1 (default 12355)
#   --log_dir=DIR       logs of processes 1..N-1 (default .)
#   --python=EXE        interpreter (default: $PYTHON or python)
#   --dry_run           print the commands (one per process), run nothing
#
# Example (2 processes x 4 fake CPU devices, data-parallel with jit):
#   bash launch/local.sh --num_processes=2 --cpu_devices=4 -- \
#       --config=experiments/configs/embedded.py --workdir=/tmp/mmsafe/run
#
# SIGTERM/SIGINT to this script are forwarded to every process (each saves a
# checkpoint and stops); the exit status is the first non-zero status of the
# processes (143: preempted, rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."

num_processes=1 cpu_devices="" parallel="" port=12355 log_dir=. python="${PYTHON:-python}"
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --cpu_devices=*) cpu_devices="${1#*=}" ;;
    --parallel=*) parallel="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (experiments.train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
train_args=("$@")
case "$num_processes" in ''|*[!0-9]*|0) echo "local.sh: --num_processes: expected >= 1" >&2; exit 2 ;; esac
if [ -z "$parallel" ] && { [ "$num_processes" -gt 1 ] || [ "${cpu_devices:-1}" -gt 1 ]; }; then
  parallel=jit
fi
[ -n "$parallel" ] && train_args+=("--config.parallel=$parallel")

# command_for <process id>: fills the array `cmd`.
command_for() {
  cmd=()
  [ -n "$cpu_devices" ] && cmd+=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  cmd+=("$python" -m experiments.train "${train_args[@]}")
  if [ "$num_processes" -gt 1 ]; then
    cmd+=(--distributed=on "--coordinator_address=127.0.0.1:$port"
          "--num_processes=$num_processes" "--process_id=$1")
  fi
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i"
    line=$(printf '%q ' "${cmd[@]}")
    [ "$i" -gt 0 ] && line+="> $(printf '%q' "$log_dir/process_$i.log") 2>&1"
    echo "${line% }"
  done
  exit 0
fi

pids=()
forward() { for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT
mkdir -p "$log_dir"
for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  if [ "$i" = 0 ]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (> 128) when a trapped signal arrives: wait again.
  while true; do
    set +e
    wait "$pid"
    rc=$?
    set -e
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  [ "$status" = 0 ] && status=$rc
done
exit "$status"
