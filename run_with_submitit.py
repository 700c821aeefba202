"""Launch training of any detector family (``--model``) on a SLURM cluster through submitit (optional dependency:
``pip install submitit``).

Example: ``python run_with_submitit.py --nodes 4 --ngpus 8 --partition learn --coco_path /data/coco``.
Every main.py flag is accepted. One task per GPU; each task gets RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT so main.py initialises with ``--dist_url env://``. Checkpoints and logs go to
``--output_dir`` (default: the job folder, ``%j`` replaced by the SLURM job id, stable across requeues).

Preemption and time limits: SLURM sends SIGUSR1 ``slurm_signal_delay_s`` before the end; submitit calls
`Trainer.checkpoint`, which requeues the same command with ``--resume auto`` so the new job continues from
the newest complete checkpoint in output_dir.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import main as main_module
from cli.arguments import FamilyArgumentParser
from models import FAMILIES


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags plus the SLURM launch flags."""
    # The family-aware parser class, so --model picks its published defaults here too.
    titles = ", ".join(family.title for family in FAMILIES.values())
    parser = FamilyArgumentParser(
        prog="run_with_submitit.py",
        description=f"Train DETR-family detectors ({titles}; --model) on SLURM through submitit: main.py's flags "
        "plus the SLURM launch flags.",
        parents=[main_module.get_args_parser(add_help=False)],
        add_help=True,
    )
    group = parser.add_argument_group("SLURM launch")
    group.add_argument("--ngpus", default=8, type=int, help="GPUs (= tasks) per node")
    group.add_argument("--nodes", default=1, type=int, help="number of nodes")
    group.add_argument("--timeout", default=4320, type=int, help="job time limit in minutes")
    group.add_argument("--partition", default="", help="SLURM partition (empty: the cluster default)")
    group.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per task (data loading)")
    group.add_argument("--mem_gb", default=0, type=int, help="memory per node in GB (0: the cluster default)")
    group.add_argument(
        "--job_dir",
        default="submitit_jobs/%j",
        help="folder for submitit logs and (without --output_dir) checkpoints; %%j becomes the job id",
    )
    group.add_argument("--max_requeues", default=30, type=int, help="requeues allowed after time-outs")
    return parser


def import_submitit() -> ModuleType:
    """Import submitit, or exit with a one-line message saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise SystemExit(
            "error: run_with_submitit.py needs the optional package submitit: pip install submitit"
        ) from None
    return submitit


class Trainer:
    """The callable submitit runs on every task: sets up the distributed environment, then main.main(args)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> None:
        submitit = import_submitit()
        env = submitit.JobEnvironment()
        self.args = prepare_task_args(self.args, env)
        export_distributed_env(env)
        main_module.main(self.args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time-out: requeue the same run with ``--resume auto``."""
        submitit = import_submitit()
        resumed = copy.deepcopy(self.args)
        resumed.resume = "auto"
        return submitit.helpers.DelayedSubmission(type(self)(resumed))

    __submitit_checkpoint__ = checkpoint  # the method name newer submitit versions look up


def prepare_task_args(args: argparse.Namespace, env: Any) -> argparse.Namespace:
    """Resolve the per-job output folder (``%j`` = job id) and the env:// rendez-vous."""
    args = copy.deepcopy(args)
    if not args.output_dir:
        args.output_dir = str(args.job_dir).replace("%j", str(env.job_id))
    args.dist_url = "env://"
    return args


def export_distributed_env(env: Any) -> None:
    """Set the torchrun-style variables from the submitit job environment (values already set win)."""
    hostnames = list(env.hostnames) or ["127.0.0.1"]
    job_digits = "".join(ch for ch in str(env.job_id) if ch.isdigit()) or "0"
    defaults = {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // max(1, env.num_nodes))),
        "MASTER_ADDR": hostnames[0],
        # A job-specific port, so two jobs sharing a first node do not collide.
        "MASTER_PORT": str(20000 + int(job_digits[-6:]) % 20000),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _require_slurm(cluster: str) -> None:
    """Exit with one line off a SLURM cluster (submitit would run the job here, in a literal '%j' folder)."""
    if cluster != "slurm":
        raise SystemExit(
            f"error: no SLURM cluster here (submitit found '{cluster}': sbatch/srun are not on PATH); "
            "run_with_submitit.py only submits SLURM jobs: train locally with python main.py or torchrun"
        )


def submit(args: argparse.Namespace) -> Any:
    """Submit the training job; returns the submitit Job."""
    submitit = import_submitit()
    which = getattr(submitit.AutoExecutor, "which", None)  # 'slurm', or 'local'/'debug' off a cluster
    _require_slurm(which() if callable(which) else "slurm")
    job_dir = Path(args.job_dir).expanduser().absolute()
    args.job_dir = str(job_dir)
    executor = submitit.AutoExecutor(folder=str(job_dir), slurm_max_num_timeout=args.max_requeues)
    _require_slurm(getattr(executor, "cluster", "slurm"))
    params: dict[str, Any] = {
        "gpus_per_node": args.ngpus,
        "tasks_per_node": args.ngpus,
        "cpus_per_task": args.cpus_per_task,
        "nodes": args.nodes,
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": 120,
        "name": args.model,  # the SLURM job name: the family (published: "detr")
    }
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb > 0:
        params["mem_gb"] = args.mem_gb
    executor.update_parameters(**params)
    args.dist_url = "env://"
    job = executor.submit(Trainer(args))
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.ngpus} GPU(s), logs in {job_dir}")
    return job


def main(argv: list[str] | None = None) -> Any:
    """Parse the command line and submit (``argv`` defaults to sys.argv[1:])."""
    args = get_args_parser().parse_args(argv)
    return submit(args)


if __name__ == "__main__":
    main()
