"""Preemption flag handler, SLURM requeue, and the submitit launcher's offline behaviour."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from run.preemption import PreemptionHandler, requeue_slurm_job, slurm_job_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sentinel_handlers():
    """Install recording handlers for SIGTERM/SIGUSR1 (restored afterwards); yields the list of calls."""
    calls = []

    def sentinel(signum, frame):
        calls.append(signum)

    saved = {s: signal.signal(s, sentinel) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield sentinel, calls
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_sets_the_flag_and_handlers_are_restored(sentinel_handlers, sig):
    sentinel, calls = sentinel_handlers
    with PreemptionHandler() as preemption:
        assert not preemption.requested
        assert signal.getsignal(sig) is not sentinel
        os.kill(os.getpid(), sig)
        assert preemption.requested and preemption.signal_name == sig.name
        assert preemption.requested_on_any_rank()  # no process group: the local flag
    assert calls == []  # the signal went to the handler, not to the previous one
    assert signal.getsignal(signal.SIGTERM) is sentinel and signal.getsignal(signal.SIGUSR1) is sentinel


def test_forward_to_previous_redelivers_to_a_python_handler(sentinel_handlers):
    sentinel, calls = sentinel_handlers
    preemption = PreemptionHandler().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.forward_to_previous() is True
    assert calls == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is sentinel


def test_forward_to_previous_never_resends_to_the_default_action():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # default action of SIGUSR1: terminate
    try:
        preemption = PreemptionHandler([signal.SIGUSR1]).install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.forward_to_previous() is False  # still alive
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_subprocess_exits_cleanly_on_sigterm():
    """A loop that checks the flag saves and exits 0 instead of dying with -SIGTERM."""
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from run.preemption import PreemptionHandler
        with PreemptionHandler() as preemption:
            print("ready", flush=True)
            steps = 0
            while not preemption.requested:
                time.sleep(0.01)
                steps += 1
            print(f"saved at step {steps} after {preemption.signal_name}", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "after SIGTERM" in out


@pytest.fixture
def slurm_env(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("run.preemption.subprocess.run", fake_run)
    monkeypatch.setattr("run.preemption.shutil.which", lambda name: f"/usr/bin/{name}")
    return monkeypatch, calls


def test_requeue_calls_scontrol_only_under_slurm_on_task_zero(slurm_env):
    monkeypatch, calls = slurm_env
    assert slurm_job_id() is None and requeue_slurm_job() is False and calls == []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert requeue_slurm_job() is False and calls == []
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert requeue_slurm_job() is True
    assert calls == [["/usr/bin/scontrol", "requeue", "4242"]]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "100_7"


def test_requeue_reports_a_failing_scontrol(slurm_env):
    monkeypatch, _ = slurm_env
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(
        "run.preemption.subprocess.run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "denied")
    )
    assert requeue_slurm_job() is False
    monkeypatch.setattr("run.preemption.shutil.which", lambda name: None)
    assert requeue_slurm_job() is False


# ------------------------------------------------------------------------------------- run_with_submitit


def _fake_submitit(job_env=None) -> tuple[types.ModuleType, dict]:
    """A stand-in for the submitit package recording what the launcher asks of it."""
    record: dict = {}

    class DelayedSubmission:
        def __init__(self, function, *args, **kwargs):
            self.function, self.args, self.kwargs = function, args, kwargs

    class AutoExecutor:
        def __init__(self, folder, **kwargs):
            record["folder"], record["executor_kwargs"] = folder, kwargs

        def update_parameters(self, **params):
            record["params"] = params

        def submit(self, fn):
            record["submitted"] = fn
            return types.SimpleNamespace(job_id="12345")

    module = types.ModuleType("submitit")
    module.helpers = types.SimpleNamespace(DelayedSubmission=DelayedSubmission)
    module.AutoExecutor = AutoExecutor
    module.JobEnvironment = lambda: job_env
    return module, record


def test_launcher_parses_main_flags_and_slurm_flags():
    import main
    import run_with_submitit

    args = run_with_submitit.get_args_parser().parse_args(["--nodes", "4", "--ngpus", "2", "--lr", "3e-4"])
    assert (args.nodes, args.ngpus, args.lr, args.timeout, args.partition) == (4, 2, 3e-4, 4320, "")
    defaults = vars(main.get_args_parser().parse_args([]))
    assert {k: v for k, v in vars(args).items() if k in defaults and k != "lr"} == {
        k: v for k, v in defaults.items() if k != "lr"
    }


def test_launcher_submits_one_task_per_gpu(monkeypatch, tmp_path):
    import run_with_submitit

    fake, record = _fake_submitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    job_dir = tmp_path / "jobs" / "%j"
    job = run_with_submitit.main(["--nodes", "2", "--ngpus", "4", "--partition", "gpu", "--job_dir", str(job_dir)])
    assert job.job_id == "12345"
    assert record["folder"] == str(job_dir)
    params = record["params"]
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 4320
    assert isinstance(record["submitted"], run_with_submitit.Trainer)


def test_launcher_off_slurm_is_one_line_and_creates_no_job_folder(monkeypatch, tmp_path):
    """Issue 15: off a cluster submitit ran the job locally in a literal '%j' folder, silently."""
    import run_with_submitit

    fake, record = _fake_submitit()
    fake.AutoExecutor.which = staticmethod(lambda: "local")
    monkeypatch.setitem(sys.modules, "submitit", fake)
    with pytest.raises(SystemExit) as info:
        run_with_submitit.main(["--job_dir", str(tmp_path / "jobs" / "%j")])
    message = str(info.value.code)
    assert message.startswith("error: no SLURM cluster here") and "python main.py" in message
    assert "submitted" not in record and not (tmp_path / "jobs").exists()


def test_checkpoint_requeues_with_resume_auto(monkeypatch):
    import run_with_submitit

    fake, _ = _fake_submitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    args = run_with_submitit.get_args_parser().parse_args(["--output_dir", "/runs/a", "--resume", "old.pth"])
    trainer = run_with_submitit.Trainer(args)
    delayed = trainer.__submitit_checkpoint__()
    assert isinstance(delayed, fake.helpers.DelayedSubmission)
    requeued = delayed.function
    assert isinstance(requeued, run_with_submitit.Trainer) and requeued is not trainer
    assert requeued.args.resume == "auto" and requeued.args.output_dir == "/runs/a"
    assert args.resume == "old.pth"  # the running job's arguments are untouched


def test_task_setup_exports_distributed_env(monkeypatch):
    import run_with_submitit

    env = types.SimpleNamespace(
        job_id="777", global_rank=5, local_rank=1, num_tasks=8, num_nodes=2, hostnames=["node-a", "node-b"]
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    run_with_submitit.export_distributed_env(env)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert os.environ["MASTER_ADDR"] == "node-a" and os.environ["LOCAL_WORLD_SIZE"] == "4"
    assert 20000 <= int(os.environ["MASTER_PORT"]) < 40000
    args = run_with_submitit.get_args_parser().parse_args(["--job_dir", "/shared/%j"])
    resolved = run_with_submitit.prepare_task_args(args, env)
    assert resolved.output_dir == "/shared/777" and resolved.dist_url == "env://"


def test_missing_submitit_gives_install_hint(monkeypatch):
    import run_with_submitit

    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(SystemExit, match="pip install submitit"):
        run_with_submitit.main(["--nodes", "1"])
