r"""Runs experiments.train on every worker of a Cloud TPU VM (pod slice).

  python launch/tpu_pod.py --tpu=mmsafe-v4-32 --zone=us-central2-b \
      [--project=P] [--create --accelerator_type=v4-32 [--spot]] [--setup] \
      [--background] [--dry_run] -- \
      --config=experiments/configs/embedded.py --workdir=/mnt/shared/mmsafe/run

Steps, each a `gcloud compute tpus tpu-vm` command:

1. `--create`: create the TPU VM (`--spot` for a preemptible one).
2. `--setup`: pack this working tree (`tar`, without .git), copy it to every
   worker (`scp --worker=all`), and install it there (`ssh --worker=all`): a
   virtualenv, `launch/setup.sh`, then `jax[tpu]`.
3. Always: start `python -m experiments.train <flags> --config.parallel=<mode>
   --distributed=on` on all workers at once (`ssh --worker=all`); JAX finds the
   pod's coordinator and process ids itself. `--background` detaches it (log:
   ~/mmsafe-train.log on each worker).

`--workdir` must be a directory every worker shares (a Filestore/NFS mount, or a
bucket mounted with gcsfuse at the same path on all workers): every process
reads the checkpoints. Rerunning step 3 (e.g. after a spot TPU is preempted and
re-created) resumes from the latest checkpoint. `--dry_run` prints the exact
commands and runs none.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "/tmp/mmsafe-src.tar.gz"
REMOTE_DIR = "~/mmsafe"
REMOTE_VENV = "~/mmsafe-venv"
REMOTE_LOG = "~/mmsafe-train.log"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher options, experiments.train flags) of `argv` (flags after `--`)."""
  argv = list(argv)
  train_args = []
  if "--" in argv:
    split = argv.index("--")
    argv, train_args = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tpu", required=True, help="TPU VM name.")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  parser.add_argument("--create", action="store_true", help="Create the TPU VM first.")
  parser.add_argument("--accelerator_type", default="v4-32")
  parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM image.")
  parser.add_argument("--spot", action="store_true", help="Create a spot (preemptible) TPU.")
  parser.add_argument("--setup", action="store_true",
                      help="Copy this working tree to all workers and install it.")
  parser.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
  parser.add_argument("--background", action="store_true",
                      help=f"Detach the training processes (log: {REMOTE_LOG}).")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
  args = parser.parse_args(argv)
  if not any(a.startswith("--workdir") for a in train_args):
    parser.error("experiments.train flags after --: expected at least --config and --workdir")
  return args, train_args


def _gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def commands(args: argparse.Namespace, train_args: Sequence[str]) -> list[list[str]]:
  """The commands to run, in order (each an argv list)."""
  out = []
  if args.create:
    out.append(_gcloud(args, "create", args.tpu, f"--accelerator-type={args.accelerator_type}",
                       f"--version={args.version}", *(["--spot"] if args.spot else [])))
  if args.setup:
    install = " && ".join([
        "sudo apt-get update -qq",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv",
        f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf ~/{os.path.basename(ARCHIVE)} -C {REMOTE_DIR}",
        f"python3 -m venv {REMOTE_VENV}", f". {REMOTE_VENV}/bin/activate",
        f"cd {REMOTE_DIR}", "bash launch/setup.sh", "python -m pip install -q 'jax[tpu]'"])
    out.append(["tar", "--exclude=.git", "-czf", ARCHIVE, "-C", REPO, "."])
    out.append(_gcloud(args, "scp", ARCHIVE, f"{args.tpu}:~/{os.path.basename(ARCHIVE)}",
                       "--worker=all"))
    out.append(_gcloud(args, "ssh", args.tpu, "--worker=all", f"--command={install}"))
  train = shlex.join(["python", "-m", "experiments.train", *train_args,
                      f"--config.parallel={args.parallel}", "--distributed=on"])
  run = f"cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && {train}"
  if args.background:
    run = f"nohup bash -c {shlex.quote(run)} > {REMOTE_LOG} 2>&1 < /dev/null &"
  out.append(_gcloud(args, "ssh", args.tpu, "--worker=all", f"--command={run}"))
  return out


def main(argv: Sequence[str]) -> int:
  args, train_args = parse_args(argv)
  for cmd in commands(args, train_args):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      status = subprocess.call(cmd)
      if status:
        return status
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
