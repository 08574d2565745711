"""A stand-in for SLURM's `sbatch` / `sacct` / `srun` / `scancel` on one machine, for tests.

`install(bin_dir)` writes the four commands into `bin_dir` (put it first on PATH). `sbatch
script.sh` prints `Submitted batch job <id>` as SLURM does and starts, detached, what the
allocation would run: for each array task (`#SBATCH --array=0-N`, one after another), the
script's `srun` command once per task of `--nodes` x `--ntasks-per-node`, each process with
the environment SLURM gives a task on a multi-node allocation (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID,
SLURM_ARRAY_TASK_ID, SLURM_NTASKS, SLURM_JOB_NUM_NODES, SLURM_NODEID, SLURM_PROCID,
SLURM_LOCALID, SLURM_JOB_NODELIST, ...), all on localhost; the `export` lines and the setup
lines of the script run first. Node ranks differ per task, so a 2-node x 1-task allocation is
two processes with SLURM_NODEID 0 and 1. `sacct` reports nothing (submitit then waits for the
tasks' result files, as it does on a cluster); `scancel` kills the tasks. Every submitted script
is kept as `<state>/<job id>.sbatch`.

The job id is chosen so that the port submitit's TorchDistributedEnvironment derives from it
(`random.Random(job_id).randint(20000, 60000)`, no MASTER_PORT set) is free on this machine.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = "SLURM_STUB_STATE"  # directory for job bookkeeping (pids, submitted scripts), set by install()
RECORD_ONLY = "SLURM_STUB_RECORD_ONLY"  # set: sbatch only records the script (<state>/<job>.sbatch), runs nothing


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _job_id(array: bool) -> str:
    while True:
        job = str(random.randint(100000, 999999))
        first = f"{job}_0" if array else job
        if _port_free(random.Random(first).randint(20000, 60000)):
            return job


def sbatch(script_path: str) -> int:
    script = Path(script_path).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", script, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", script, re.M).group(1))
    m = re.search(r"^#SBATCH --array=0-(\d+)", script, re.M)
    array = int(m.group(1)) + 1 if m else None
    job = _job_id(array is not None)
    print(f"Submitted batch job {job}", flush=True)
    state = Path(os.environ[STATE])
    state.mkdir(parents=True, exist_ok=True)
    (state / f"{job}.sbatch").write_text(script)  # exactly what was submitted
    if os.environ.get(RECORD_ONLY):
        return 0
    runner = subprocess.Popen([sys.executable, __file__, "run", script_path, job, str(nodes), str(per_node), str(array or 0)],
                              start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(state / f"{job}_runner.err", "w"))
    (state / f"{job}.pid").write_text(str(runner.pid))
    return 0


def _body(script: str) -> tuple[list[str], list[str]]:
    """(the lines before srun: exports and setup, the srun command's argv after `srun` options)."""
    lines = [ln for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    i = next(k for k, ln in enumerate(lines) if ln.startswith("srun "))
    argv = shlex.split(lines[i])[1:]
    while argv and argv[0].startswith("--"):  # srun's own options: --unbuffered, --output X, --error X
        opt = argv.pop(0)
        if opt in ("--output", "--error"):
            argv.pop(0)
    return lines[:i], argv


def run(script_path: str, job: str, nodes: int, per_node: int, array: int) -> None:
    script = Path(script_path).read_text()
    before, argv = _body(script)
    folder = argv[-1]  # submitit.core._submit <folder with %j>
    ntasks = nodes * per_node
    for index in range(array or 1):
        job_id = f"{job}_{index}" if array else job
        if array:  # submitit renames the array's pickles into place after sbatch returns
            pickle = Path(folder.replace("%j", job_id)) / f"{job_id}_submitted.pkl"
            deadline = time.time() + 60
            while not pickle.exists() and time.time() < deadline:
                time.sleep(0.1)
        procs = []
        log_dir = Path(folder.replace("%j", job_id))
        log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(ntasks):
            env = {**os.environ,
                   "SLURM_JOB_ID": str(int(job) + index + 1) if array else job,
                   "SLURM_JOB_NAME": "stub", "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
                   "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
                   "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
                   "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURMD_NODENAME": "localhost",
                   "SLURM_NODEID": str(rank // per_node), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
                   "SLURM_STEP_ID": "0"}
            if array:
                env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(index))
            cmd = "\n".join([*before, "exec " + shlex.join(argv)])
            out = open(log_dir / f"{job_id}_{rank}_log.out", "a")
            err = open(log_dir / f"{job_id}_{rank}_log.err", "a")
            procs.append(subprocess.Popen(["bash", "-c", cmd], env=env, stdout=out, stderr=err))
        state = Path(os.environ[STATE])
        (state / f"{job}.tasks").write_text(" ".join(str(p.pid) for p in procs))
        for p in procs:
            p.wait()


def sacct() -> int:
    print("JobID|State|NodeList")
    return 0


def scancel(ids: list[str], state: Path | None = None) -> int:
    state = Path(os.environ[STATE]) if state is None else state
    for job in ids:
        job = job.split("_")[0]
        for name in (f"{job}.tasks", f"{job}.pid"):
            f = state / name
            if f.exists():
                for pid in f.read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGTERM)
                    except (ProcessLookupError, ValueError):
                        pass
    return 0


def install(bin_dir: Path, state_dir: Path) -> dict:
    """Write sbatch / sacct / srun / scancel into `bin_dir`; returns the environment to run with."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "sacct", "srun", "scancel"):
        f = bin_dir / name
        f.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {name} \"$@\"\n")
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", STATE: str(state_dir)}


def kill_all(state_dir: Path) -> None:
    """Stop every task a test's sbatch started (test teardown)."""
    if state_dir.is_dir():
        scancel([p.stem for p in state_dir.glob("*.pid")], state_dir)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sbatch":
        raise SystemExit(sbatch(args[-1]))
    if cmd == "run":
        run(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif cmd == "sacct":
        raise SystemExit(sacct())
    elif cmd == "scancel":
        raise SystemExit(scancel([a for a in args if not a.startswith("-")]))
    elif cmd == "srun":
        raise SystemExit(0)
