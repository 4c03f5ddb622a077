#!/usr/bin/env bash
# Submits launch/slurm.sbatch: experiments.train data-parallel over all GPUs of
# --nodes nodes (one process per GPU), resumable and requeued on preemption.
#
#   bash launch/slurm_submit.sh [options] -- <experiments.train flags>
#
# Options:
#   --nodes=N             nodes (default 1)
#   --gpus_per_node=G     GPUs (= processes) per node (default 8)
#   --cpus_per_gpu=C      CPU cores per process (default 8)
#   --time=T              time limit (default 24:00:00); the run is requeued at the limit
#   --partition=P         SLURM partition (default: the cluster's)
#   --account=A           SLURM account (default: the user's)
#   --job_name=NAME       job name (default mmsafe)
#   --parallel=MODE       adds --config.parallel=MODE (jit|pmap; default jit)
#   --dry_run             print the sbatch command, submit nothing
#
# Example: two 8-GPU nodes:
#   bash launch/slurm_submit.sh --nodes=2 -- --config=experiments/configs/embedded.py \
#       --config.method=crmt --workdir=/shared/mmsafe/crmt
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1 gpus_per_node=8 cpus_per_gpu=8 time=24:00:00 partition="" account="" job_name=mmsafe
parallel=jit dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
    --cpus_per_gpu=*) cpus_per_gpu="${1#*=}" ;;
    --time=*) time="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --parallel=*) parallel="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "slurm_submit.sh: unknown option $1 (experiments.train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

cmd=(sbatch "--job-name=$job_name" "--nodes=$nodes" "--ntasks-per-node=$gpus_per_node"
     "--gpus-per-node=$gpus_per_node" "--cpus-per-task=$cpus_per_gpu" "--time=$time"
     "--chdir=$PWD")
[ -n "$partition" ] && cmd+=("--partition=$partition")
[ -n "$account" ] && cmd+=("--account=$account")
cmd+=(launch/slurm.sbatch "$@" "--config.parallel=$parallel")

if [ "$dry_run" = 1 ]; then
  line=$(printf '%q ' "${cmd[@]}")
  echo "${line% }"
  exit 0
fi
"${cmd[@]}"
