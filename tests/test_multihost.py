"""Multi-process training with real processes: N x `python -m vit_jax.main` on 127.0.0.1.

Each child gets its own XLA_FLAGS (4 fake CPU devices) and joins `jax.distributed` through
--coordinator_address / --num_processes / --process_id; the collectives run over gloo. The
single-process reference is the same command as one process with 8 fake devices: same folder,
same config, nothing of the pipeline reproduced here. The children share a persistent compilation
cache: the launches of one schedule compile once (start-up and XLA compilation dominate each
launch on 2 CPU cores).
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import numpy as np
import pytest

from configs import testing as testing_config
from tests.image_folders import COLORS, write_colour_folder
from vit_jax import checkpoint, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
TIMEOUT_S = 300  # one launch, start-up to exit (measured up to 80 s on 2 busy shared cores)
STEPS = 24
# Every 2-process launch trains this schedule, so the jit run is also the uninterrupted reference
# of the kill-and-resume chain. 21 test images (7 per class) vs. batch_eval 16: padded eval.
# float32 momentum: a bfloat16 buffer rounds the all-reduce's summation-order noise (1e-7) up
# to 3e-5 in 24 steps (measured), which would blur the 2-process vs. 1-process comparison.
SCHEDULE = {
  "total_steps": STEPS,
  "eval_every": 12,
  "checkpoint_every": 4,
  "progress_every": 2,
  "optim_dtype": "float32",
}
TEST_SIZE = 7 * len(COLORS)


# ---------------------------------------------------------------------------------------------
# Launching processes.


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Launch:
  """The processes of one run (one per process id) and their log files."""

  workdir: str
  procs: list[subprocess.Popen]
  stdout: list[str]
  stderr: list[str]

  def tails(self, chars: int = 2500) -> str:
    out = []
    for i, path in enumerate(self.stderr):
      with open(path, errors="replace") as f:
        lines = [l for l in f if not l.startswith("[Gloo]")]  # one line per connection
      out.append(
        f"--- process {i} (exit {self.procs[i].poll()}) stderr tail:\n" + "".join(lines)[-chars:]
      )
    return "\n".join(out)

  def kill(self, sig: int = signal.SIGKILL) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(sig)
    for p in self.procs:
      p.wait()


def _child_env(devices: Optional[int], cache_dir: str) -> dict[str, str]:
  # No cluster may leak in from the test's own environment (a CI job under SLURM, say), and
  # pytest's 8 devices (conftest's XLA_FLAGS) are not the children's.
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "OMPI_", "JAX_")) and k != "XLA_FLAGS"
  }
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  return env


def launch(
  workdir: str, args: list[str], cache_dir: str, *, processes: int = 2, devices: Optional[int] = 4
) -> Launch:
  """Starts `processes` x vit_jax.main on a fresh port; `devices=None`: no XLA flag (1 CPU)."""
  port = free_port()
  logs = tempfile.mkdtemp(prefix=os.path.basename(workdir) + "_logs_", dir=os.path.dirname(workdir))
  procs, stdout, stderr = [], [], []
  for i in range(processes):
    cmd = [
      sys.executable,
      "-m",
      "vit_jax.main",
      "--config=configs/testing.py",
      f"--workdir={workdir}",
      *args,
    ]
    if processes > 1:
      cmd += [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ]
    stdout.append(os.path.join(logs, f"{i}.out"))
    stderr.append(os.path.join(logs, f"{i}.err"))
    # Files, not pipes: nobody reads a pipe while the run goes on, and a full one blocks it.
    with open(stdout[-1], "w") as out, open(stderr[-1], "w") as err:
      procs.append(
        subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=_child_env(devices, cache_dir))
      )
  return Launch(workdir, procs, stdout, stderr)


def finish(run: Launch, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
  """Waits for every process; kills them all and fails with their stderr on a timeout or error.

  Returns each process's summary (the JSON line main prints last).
  """
  deadline = time.monotonic() + timeout
  for p in run.procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      run.kill()
      pytest.fail(f"{run.workdir}: not done after {timeout} s\n{run.tails()}")
  if any(p.returncode != 0 for p in run.procs):
    pytest.fail(f"{run.workdir}: a process failed\n{run.tails()}")
  summaries = []
  for path in run.stdout:
    with open(path) as f:
      summaries.append(json.loads(f.read().strip().splitlines()[-1]))
  return summaries


def steps(workdir: str) -> list[int]:
  ckpts = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


def wait_for_checkpoint(run: Launch, min_step: int, timeout: float = TIMEOUT_S) -> int:
  """Polls until a finished checkpoint >= min_step exists; fails if a process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    done = [s for s in steps(run.workdir) if s >= min_step]  # orbax renames when finished
    if done:
      return done[0]
    if any(p.poll() is not None for p in run.procs):
      run.kill()
      pytest.fail(f"a process exited before checkpoint {min_step}\n{run.tails()}")
    time.sleep(0.02)
  run.kill()
  pytest.fail(f"no checkpoint >= {min_step} in {run.workdir} after {timeout} s\n{run.tails()}")


def cli_args(folder: str, **overrides: Any) -> list[str]:
  return [f"--config.dataset={folder}"] + [
    f"--config.{k}={v}" for k, v in {**SCHEDULE, **overrides}.items()
  ]


# ---------------------------------------------------------------------------------------------
# Results.


def params(workdir: str) -> dict[str, Any]:
  return checkpoint.load(os.path.join(workdir, "params.npz"))


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Fixtures: each run once per module.


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  return write_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def jit_2x4(runs, folder, cache_dir):
  workdir = os.path.join(runs, "jit_2x4")
  run = launch(workdir, cli_args(folder), cache_dir)
  return workdir, finish(run), run


@pytest.fixture(scope="module")
def jit_1x8(runs, folder, cache_dir):
  """The reference: the same command as jit_2x4, as one process with 8 devices."""
  workdir = os.path.join(runs, "jit_1x8")
  [summary] = finish(launch(workdir, cli_args(folder), cache_dir, processes=1, devices=8))
  return workdir, summary


@pytest.fixture(scope="module")
def interrupted(runs, folder, cache_dir):
  """One run, 2 processes throughout: SIGTERM to process 1 only, restart, SIGKILL to both
  once a newer checkpoint exists, restart to the end."""
  workdir = os.path.join(runs, "interrupted")
  args = cli_args(folder)
  first = launch(workdir, args, cache_dir)
  wait_for_checkpoint(first, 4)
  first.procs[1].send_signal(signal.SIGTERM)  # as a pre-empted host: the others must follow
  term = finish(first)
  term_steps = steps(workdir)
  second = launch(workdir, args, cache_dir)
  wait_for_checkpoint(second, term[0]["step"] + 1)
  second.kill()
  killed_at = max(steps(workdir))
  final = finish(launch(workdir, args, cache_dir))
  return dict(workdir=workdir, term=term, term_steps=term_steps, killed_at=killed_at, final=final)


# ---------------------------------------------------------------------------------------------
# Process set-up: flags and environment.


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--num_processes=2"],
      "error: a multi-process run needs --coordinator_address (or "
      "JAX_COORDINATOR_ADDRESS), --process_id (or JAX_PROCESS_ID) as well as --num_processes=2",
    ),
    (
      ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
      "error: --process_id=2 must be in [0, --num_processes=2)",
    ),
    (
      ["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
      "error: --coordinator_address='localhost' (or JAX_COORDINATOR_ADDRESS) is not HOST:PORT",
    ),
  ],
)
def test_bad_process_flags_are_one_error_line(tmp_path, folder, cache_dir, args, message):
  run = launch(str(tmp_path / "bad"), [f"--config.dataset={folder}", *args], cache_dir, processes=1)
  run.procs[0].wait(timeout=120)
  with open(run.stderr[0]) as f:
    err = f.read()
  assert run.procs[0].returncode == 2, err[-2000:]
  assert message in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "bad")  # failed before any work


_ALL3 = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}


@pytest.mark.parametrize(
  "flag_values, environ, expected",
  [
    ((None, None, None), {}, {}),  # none given: jax's own cluster detection
    (
      (None, None, None),
      _ALL3,
      dict(
        coordinator_address="h:1",
        num_processes=4,
        process_id=1,
        cluster_detection_method="deactivate",
      ),
    ),
    (
      ("h:2", None, 0),
      _ALL3,  # a flag wins over its variable
      dict(
        coordinator_address="h:2",
        num_processes=4,
        process_id=0,
        cluster_detection_method="deactivate",
      ),
    ),
  ],
)
def test_distributed_args_from_flags_and_environment(flag_values, environ, expected):
  assert main.distributed_args(*flag_values, environ) == expected


@pytest.mark.parametrize(
  "environ, message",
  [
    (
      {"JAX_NUM_PROCESSES": "4"},
      "needs --coordinator_address (or JAX_COORDINATOR_ADDRESS), "
      "--process_id (or JAX_PROCESS_ID) as well as --num_processes=4",
    ),
    (dict(_ALL3, JAX_PROCESS_ID="one"), "JAX_PROCESS_ID='one' is not an integer"),
  ],
)
def test_half_given_or_malformed_variables_are_named(environ, message):
  with pytest.raises(main.DistributedSetupError, match=re.escape(message)):
    main.distributed_args(None, None, None, environ)


def test_mpirun_that_jax_cannot_read_is_one_error_line(tmp_path, folder):
  # Open MPI 5 sets none of the variables jax reads: 4 processes would each train alone.
  env = dict(os.environ, OMPI_COMM_WORLD_SIZE="4", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "vit_jax.main",
      f"--config={REPO}/configs/testing.py",
      f"--workdir={tmp_path / 'mpi'}",
      f"--config.dataset={folder}",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    cwd=REPO,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: OMPI_COMM_WORLD_SIZE=4 but jax found no cluster" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "mpi")


def test_launch_scripts_are_valid_bash():
  for name in ("tpu_vm.sh", "slurm_train.sbatch"):
    result = subprocess.run(
      ["bash", "-n", os.path.join(SCRIPTS, name)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"{name}: {result.stderr}"


# ---------------------------------------------------------------------------------------------
# 2 processes x 4 devices == 1 process x 8 devices, same global batch.


def test_jit_two_processes_equal_one_process_with_eight_devices(jit_2x4, jit_1x8):
  (workdir, summaries, _), (reference, summary) = jit_2x4, jit_1x8
  assert [s["step"] for s in summaries] == [STEPS, STEPS] and summary["step"] == STEPS
  # The same command, another process count: the global batches must not depend on it. Only the
  # summation order of the all-reduce differs: measured 1.2e-7 on parameters up to 1.2; each
  # process shuffling its own half of the folder gave 0.1.
  assert max_diff(params(workdir), params(reference)) <= 1e-5


def test_pmap_two_processes_equal_one_process_with_eight_devices(runs, folder, cache_dir, jit_1x8):
  # The reference is the 1 x 8 jit run; tests/test_train.py shows that pmap and jit agree on one
  # process. Measured 1.2e-7.
  workdir = os.path.join(runs, "pmap_2x4")
  summaries = finish(launch(workdir, cli_args(folder, parallelism="pmap"), cache_dir))
  assert [s["step"] for s in summaries] == [STEPS, STEPS]
  assert all(s["test_count"] == TEST_SIZE for s in summaries)  # psum over both hosts' devices
  assert max_diff(params(workdir), params(jit_1x8[0])) <= 1e-5


def test_evaluation_counts_every_test_example_once_over_two_processes(jit_2x4):
  workdir, summaries, _ = jit_2x4
  assert TEST_SIZE % testing_config.get_config().batch_eval != 0  # a padded last batch
  evals = [m for m in metrics(workdir) if "test_count" in m]
  assert [(m["step"], m["test_count"]) for m in evals] == [(STEPS, TEST_SIZE)]  # once, at the end
  assert [m["step"] for m in metrics(workdir) if "val_count" in m] == [12, 24]
  assert [s["test_count"] for s in summaries] == [TEST_SIZE, TEST_SIZE]


def test_the_val_split_is_the_same_over_one_and_two_processes(jit_2x4, jit_1x8):
  (workdir, summaries, _), (reference, summary) = jit_2x4, jit_1x8
  # Each process chooses the stratified val_fraction itself: every one must hold the same.
  assert summaries[0]["splits"] == summaries[1]["splits"] == summary["splits"]
  assert summary["splits"]["val"]["examples"] == 2 * len(COLORS)  # 10 % of 24 per class
  vals = lambda w: [(m["step"], m["val_count"]) for m in metrics(w) if "val_count" in m]  # noqa: E731
  assert vals(workdir) == vals(reference) == [(12, 6), (24, 6)]


def test_only_process_zero_writes_files_and_logs(jit_2x4):
  workdir, _, run = jit_2x4
  train_steps = [m["step"] for m in metrics(workdir) if "train_loss" in m]
  assert train_steps == list(range(2, STEPS + 1, 2))  # one writer: no line twice
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  for name in ("params.npz", "params.json", "run.json"):
    assert os.path.isfile(os.path.join(workdir, name))
  with open(run.stderr[0]) as f0, open(run.stderr[1]) as f1:
    log0, log1 = f0.read(), f1.read()
  assert "test accuracy" in log0 and "exported" in log0
  assert not [l for l in log1.splitlines() if l.startswith("I") and "train.py" in l]


# ---------------------------------------------------------------------------------------------
# Pre-emption, SIGKILL and resume with 2 processes; restore on another topology.


def test_sigterm_to_one_process_stops_all_at_the_same_step(interrupted):
  term = interrupted["term"]
  assert all(s["preempted"] for s in term) and term[0]["step"] == term[1]["step"] < STEPS
  assert max(interrupted["term_steps"]) == term[0]["step"]  # its checkpoint, by both


def test_sigkill_then_resume_as_two_processes_equals_the_uninterrupted_run(interrupted, jit_2x4):
  final, killed_at = interrupted["final"], interrupted["killed_at"]
  assert interrupted["term"][0]["step"] < killed_at < STEPS
  assert [s["first_step"] for s in final] == [killed_at, killed_at]
  assert [s["step"] for s in final] == [STEPS, STEPS]
  assert max_diff(params(interrupted["workdir"]), params(jit_2x4[0])) == 0


def test_two_process_checkpoint_restores_in_one_process_on_one_device(
  interrupted, tmp_path, folder, cache_dir
):
  step = interrupted["killed_at"]
  step_dir = os.path.join(interrupted["workdir"], "checkpoints", str(step))
  workdir = str(tmp_path / "one_device")
  run = launch(
    workdir,
    cli_args(folder, resume=step_dir, total_steps=step),
    cache_dir,
    processes=1,
    devices=None,
  )
  [summary] = finish(run)
  assert summary["origin"] == f"resumed from config.resume={step_dir}"
  assert summary["first_step"] == summary["step"] == step
  with open(run.stderr[0]) as f:
    assert "JAX process 0/1, 1 local devices" in f.read()
  # The exported params are what the checkpoint holds (read as numpy, any topology) ...
  expected, _ = checkpoint.load_for_inference(step_dir)
  assert max_diff(params(workdir), expected) == 0
  # ... and not the final ones: the restore took the step asked for.
  assert max_diff(params(workdir), params(interrupted["workdir"])) > 0
