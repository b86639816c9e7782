"""A Ray Tune sweep as one Slurm job: a Ray cluster inside the allocation, the sweep driver on its head.

``facedis submit --sweep <data set or preset> --nodes N --gpus-per-node G --cpus-per-task C ... -- <tune options>``
submits one job of N tasks, one per node, each running :class:`RaySweepJob`:

* task 0 (the first node) starts ``ray start --head --block`` with this node's address, a port Ray
  picks (``--port=0``), ``--num-cpus C --num-gpus G``, an object store sized from the allocation's
  memory and a short per-job ``--temp-dir``; it writes the head's address to the run directory
  (``.launch/ray/<job>-r<restart>/head.json``), waits until every node has joined with its
  resources, then runs the sweep code itself, ``python -m facedis tune <options> --address <head>
  --out <run dir>/sweep`` (``--resume <run dir>/sweep`` when that directory already holds a started
  sweep: a requeued job continues where the last one stopped);
* every other task waits for that address and starts ``ray start --address <head> --block`` with
  the same resources; it stops its Ray when the head writes ``stop.json``.

This is Ray's recipe for Slurm (a head on the first node, workers on the others, one task per node
holding the node's resources) done from the job's Python tasks instead of a batch script, so the
launcher's conventions hold: the job is checkpointable, submitit logs it, ``facedis status`` reads it.

The Ray processes never outlive the job. Every process started here carries
``FACEDIS_RAY_NODE=<its node's temp dir>`` in its environment (Ray's workers inherit it), and the
task stops exactly those processes (never ``ray stop``, which would stop every Ray of the user on
the node): on normal exit, on failure, on SIGTERM (``scancel``, ``scontrol requeue``, preemption)
and on submitit's preemption/timeout signal (USR2, ``--signal-delay-s`` before the limit). The Ray
processes and the sweep driver ignore USR2; the job's handler stops the driver with SIGINT (Ray
Tune then saves the experiment state once more), stops Ray and requeues the job. Ray's processes are
started with token authentication (``RAY_AUTH_MODE=token``, a fresh token per job, readable only by
the user), so nobody else on a shared node can submit work to them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from facedis.extras import require

submitit = require("submitit", "cluster", "facedis submit --sweep")

from facedis.cluster.job import in_submitit_job, wait_to_be_killed  # noqa: E402

#: environment variable that marks every process of one node's Ray (value: the node's Ray temp dir)
MARKER = "FACEDIS_RAY_NODE"
#: root of the per-job Ray temp dirs: short, node-local (Ray's AF_UNIX socket paths must fit in 107 bytes)
RAY_TMP_ROOT = "/tmp"
SOCKET_PATH_MAX = 107
#: what Ray appends to its temp dir for its longest socket: /session_<date>_<time>_<us>_<pid>/sockets/plasma_store
RAY_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
OBJECT_STORE_FRACTION = 0.3  # Ray's own default share, applied to the allocation instead of the whole node
OBJECT_STORE_MIN_BYTES = 80 * 1024**2  # Ray refuses less than 75 MiB
#: ``facedis tune`` options the launcher sets itself
RESERVED_TUNE_OPTIONS = ("--address", "--out", "--resume", "--num-cpus")
SWEEP_SUBDIR = "sweep"
#: Ray Tune trial states -> the progress columns of ``facedis status``
TRIAL_STATES = {"TERMINATED": "done", "ERROR": "failed", "RUNNING": "running", "PENDING": "pending",
                "PAUSED": "pending"}
# Run in place of each Ray/driver command (argv: parent pid, command...): ignore USR2 (the job's
# handler decides what preemption does), die with the job's process (PR_SET_PDEATHSIG: a Ray whose
# task is gone must not linger as an orphan outside Slurm's process tracking), then exec the command.
_LAUNCHER = """
import ctypes, os, signal, sys
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""
_LOG = "[facedis.sweep]"


@dataclass
class SweepSpec:
    """One sweep job: where it writes, what it runs, the resources of each node."""

    name: str
    run_dir: str
    tune_argv: list[str]
    nodes: int
    cpus_per_node: int
    gpus_per_node: int = 0
    cwd: str = field(default_factory=os.getcwd)
    join_timeout_s: float = 300.0
    stop_grace_s: float = 60.0

    @property
    def out(self) -> Path:
        """The sweep's output directory (``facedis tune --out``)."""
        return sweep_out(self.run_dir)


# --------------------------------------------------------------------------------------------
# layout of a sweep's run directory


def sweep_out(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SWEEP_SUBDIR


def request_path(run_dir: str | os.PathLike) -> Path:
    """What was submitted (data set, tune options): a resubmission must match it to resume."""
    return Path(run_dir) / ".launch" / "sweep.json"


def finished_path(run_dir: str | os.PathLike) -> Path:
    """Written by the job when the sweep has run every trial (its presence means: finished)."""
    return Path(run_dir) / "finished.json"


def ray_dir(run_dir: str | os.PathLike, job_id: str, restart: int) -> Path:
    """Per job run: ``head.json`` (address), ``token``, ``nodes.json``, ``stop.json``, Ray's logs per node."""
    return Path(run_dir) / ".launch" / "ray" / f"{job_id}-r{restart}"


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to a temporary name next to ``path`` and rename it (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode), "w") as f:
        f.write(text)
    if mode is None:
        os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# pure parts: temp dir, memory, commands


def ray_temp_dir(job_id: str, restart: int, rank: int, root: str = RAY_TMP_ROOT) -> str:
    """``/tmp/rfd<job>-<restart>-<rank>``: one per task and job run, short enough for Ray's socket paths."""
    path = f"{root.rstrip('/')}/rfd{job_id}-{restart}-{rank}"
    if len(path) + RAY_SOCKET_SUFFIX > SOCKET_PATH_MAX:
        raise ValueError(f"Ray temp dir {path!r} is too long: Ray's socket paths under it would exceed "
                         f"{SOCKET_PATH_MAX} bytes")
    return path


def node_memory_bytes(environ: dict[str, str] | None = None) -> int | None:
    """The allocation's memory on this node: ``SLURM_MEM_PER_NODE`` or ``SLURM_MEM_PER_CPU`` x CPUs (MB), else None."""
    env = os.environ if environ is None else environ
    try:
        if env.get("SLURM_MEM_PER_NODE"):
            mb = int(env["SLURM_MEM_PER_NODE"])
        elif env.get("SLURM_MEM_PER_CPU"):
            cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or "1"
            mb = int(env["SLURM_MEM_PER_CPU"]) * int(cpus)
        else:
            return None
    except ValueError:
        return None
    return mb * 1024**2 if mb > 0 else None


def memory_options(mem_bytes: int | None) -> list[str]:
    """``--object-store-memory`` (30 % of the allocation, at least Ray's minimum) and ``--memory`` (the rest)."""
    if not mem_bytes:
        return []
    store = max(OBJECT_STORE_MIN_BYTES, int(mem_bytes * OBJECT_STORE_FRACTION))
    opts = ["--object-store-memory", str(store)]
    if mem_bytes > store:
        opts += ["--memory", str(mem_bytes - store)]
    return opts


def ray_start_command(*, head_address: str | None, node_ip: str, cpus: int, gpus: int, temp_dir: str,
                      ports: dict[str, int], mem_bytes: int | None = None, ray: str = "ray") -> list[str]:
    """``ray start ... --block`` for the head (``head_address`` None) or a worker joining ``head_address``.

    ``ports``: ``dashboard_agent`` (every node), ``dashboard`` and ``client`` (head): free ports, so two
    Rays on one node do not collide on Ray's fixed defaults; the head's GCS port is ``0`` (Ray picks a
    free one) and worker ports are random.
    """
    cmd = [ray, "start", "--block", f"--node-ip-address={node_ip}", f"--num-cpus={int(cpus)}",
           f"--num-gpus={int(gpus)}", f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0",
           f"--dashboard-agent-listen-port={ports['dashboard_agent']}", "--disable-usage-stats",
           *memory_options(mem_bytes)]
    if head_address is None:
        cmd[2:2] = ["--head", "--port=0", "--include-dashboard=false", f"--dashboard-port={ports['dashboard']}",
                    f"--ray-client-server-port={ports['client']}"]
    else:
        cmd[2:2] = [f"--address={head_address}"]
    return cmd


def has_started(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a sweep that Ray Tune can resume (``sweep.json`` and a saved experiment state)."""
    out = Path(out)
    return (out / "sweep.json").is_file() and any((out / "tune").glob("experiment_state-*.json"))


def tune_command(spec: SweepSpec, address: str, resume: bool, python: str = sys.executable) -> list[str]:
    """The sweep driver: ``facedis tune`` with the submitted options, joined to this job's Ray."""
    where = ["--resume", str(spec.out)] if resume else ["--out", str(spec.out)]
    return [python, "-u", "-m", "facedis", "tune", *spec.tune_argv, "--address", address, *where]


# --------------------------------------------------------------------------------------------
# progress of a sweep, from its files (facedis status, and the job's own check that it finished)


def last_json_line(path: Path) -> dict | None:
    """Last complete JSON line of a file (a line being written is ignored); None if unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _experiment_trials(exp_dir: Path) -> dict[str, dict]:
    """Trial id -> {status, last_result} from Ray Tune's newest experiment state file ({} if none is readable)."""
    for f in sorted(exp_dir.glob("experiment_state-*.json"), reverse=True):
        data = read_json(f)
        if not data:
            continue
        out = {}
        try:
            for trial_json, meta in data["trial_data"]:
                t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
                meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
                out[t["trial_id"]] = {"status": t.get("status", "?"), "last_result": meta.get("last_result") or {}}
        except (KeyError, TypeError, ValueError):
            continue
        return out
    return {}


def _planned_trials(state: dict) -> int | None:
    """``num_samples`` x the size of every ``grid:`` dimension (Ray Tune's count of trials)."""
    n = state.get("num_samples")
    if not isinstance(n, int):
        return None
    for spec in (state.get("space") or {}).values():
        if isinstance(spec, str) and spec.startswith("grid:"):
            n *= max(1, len(spec[len("grid:"):].split(",")))
        elif isinstance(spec, dict) and isinstance(spec.get("grid_search"), list):
            n *= max(1, len(spec["grid_search"]))
    return n


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sweep_progress(out: str | os.PathLike) -> dict[str, Any]:
    """What a sweep's directory says about it: trials done/running/failed/pending and the best so far.

    Reads ``sweep.json`` (planned trials, metrics), Ray Tune's newest ``tune/experiment_state-*.json``
    (each trial's state) and each trial's ``tune/<trial>/result.json`` (its reports). "Best so far" is
    the lowest ``objective`` (E_dis/s_dis + E_rec/s_rec, what ASHA ranks) among the trials' latest reports.
    """
    out = Path(out)
    state = read_json(out / "sweep.json") or {}
    exp = out / "tune"
    trials = _experiment_trials(exp)
    if exp.is_dir():  # a trial directory the state file does not list yet
        for d in exp.iterdir():
            if d.is_dir() and (d / "result.json").is_file() and d.name not in trials:
                trials[d.name] = {"status": "RUNNING", "last_result": {}}
    metrics = list(state.get("metrics") or ("E_dis_ref_mean", "E_rec_mean"))
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    rows, best = [], None
    for tid in sorted(trials):
        t = trials[tid]
        last = last_json_line(exp / tid / "result.json") or t["last_result"]
        column = TRIAL_STATES.get(t["status"], "pending")
        counts[column] += 1
        row = {"trial_id": tid, "status": t["status"], "epochs_done": last.get("epochs_done"),
               "objective": last.get("objective"), **{m: last.get(m) for m in metrics}}
        rows.append(row)
        if _is_num(row["objective"]) and (best is None or row["objective"] < best["objective"]):
            best = row
    planned = _planned_trials(state)
    if planned is not None:
        counts["pending"] += max(0, planned - len(trials))
    chosen = (read_json(out / "selection.json") or {}).get("best") or [None]
    return {"out": str(out), "started": bool(state), "dataset": state.get("dataset"), "planned": planned,
            "trials": len(trials), **counts, "best": best, "metrics": metrics, "rows": rows, "winner": chosen[0]}


# --------------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip_address(multi_node: bool) -> str:
    """This node's address for Ray.

    What the host name resolves to (Ray's Slurm recipe: ``hostname --ip-address``), unless that is a
    loopback address (``/etc/hosts`` often maps the name to 127.0.x.x); then what Ray itself picks:
    the address of the interface that routes off the node.
    """
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM):
            ip = info[4][0]
            if not ipaddress.ip_address(ip).is_loopback:
                return ip
    except OSError:
        pass
    ip = "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent
            s.connect(("8.8.8.8", 80))
            ip = s.getsockname()[0]
    except OSError:
        pass
    if multi_node and ipaddress.ip_address(ip).is_loopback:
        raise RuntimeError(f"{socket.gethostname()}: no non-loopback address for Ray; the other nodes could not reach "
                           f"this one (host name resolves to {ip})")
    return ip


def marked_pids(prefix: str) -> list[int]:
    """PIDs (not this process) whose environment has ``FACEDIS_RAY_NODE=<prefix>...``."""
    needle = f"{MARKER}={prefix}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(e.startswith(needle) for e in env.split(b"\0")):
            out.append(int(d))
    return out


def kill_marked(prefix: str, grace_s: float = 5.0) -> int:
    """SIGTERM every process marked with ``prefix``, SIGKILL what is left after ``grace_s``; returns how many."""
    pids = marked_pids(prefix)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return 0
            time.sleep(0.1)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _ray_executable() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.is_file() else (shutil.which("ray") or "ray")


def wait_for_nodes(address: str, count: int, cpus: int, gpus: int, timeout_s: float) -> list[dict]:
    """Block until ``count`` live Ray nodes each offer ``cpus`` CPUs and ``gpus`` GPUs; returns them.

    ``RuntimeError`` naming the nodes that joined and what was expected when ``timeout_s`` passes.
    Connects a Ray driver: the job runs it in a child process (``python -m facedis.cluster.ray_sweep
    wait-for-nodes ...``), since Ray installs its own SIGTERM handler in a driver's process.
    """
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.time() + timeout_s
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            ready = [n for n in alive if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
            if len(ready) >= count:
                return [{"host": n.get("NodeManagerHostname"), "ip": n.get("NodeManagerAddress"),
                         "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
                        for n in ready]
            if time.time() > deadline:
                seen = ", ".join(f"{n.get('NodeManagerHostname')} ({n['Resources'].get('CPU', 0):g} CPU, "
                                 f"{n['Resources'].get('GPU', 0):g} GPU)" for n in alive) or "none"
                raise RuntimeError(f"Ray cluster incomplete after {timeout_s:g} s: {len(ready)} of {count} nodes with "
                                   f"{cpus} CPUs and {gpus} GPUs joined the head at {address} (live nodes: {seen}); "
                                   "see the node logs in the run directory's .launch/ray/")
            time.sleep(1.0)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# the job


class _Node:
    """What one task started: its Ray temp dir, ``ray start`` and (head) the sweep driver."""

    def __init__(self, spec: SweepSpec, job_id: str, restart: int, rank: int, num_tasks: int):
        self.spec, self.job_id, self.restart, self.rank, self.num_tasks = spec, job_id, restart, rank, num_tasks
        self.temp_dir = ray_temp_dir(job_id, restart, rank)
        self.dir = ray_dir(spec.run_dir, job_id, restart)
        self.ray: subprocess.Popen | None = None
        self.driver: subprocess.Popen | None = None
        self.stopped = False

    def env(self, token_path: Path) -> dict[str, str]:
        """The environment of this node's Ray processes and of the driver (the job's, plus Ray's settings)."""
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN"):
            env.pop(k, None)  # a cluster across nodes, on real addresses; the token is the job's
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), MARKER: self.temp_dir,
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    # SIGTERM stops a node at once (Ray's default drains it for up to 30 s; Slurm kills sooner)
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        return env

    def spawn(self, cmd: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        """Start ``cmd`` through :data:`_LAUNCHER` (USR2 ignored, dies with this process)."""
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd], env=env,
                                stdin=subprocess.DEVNULL, **kw)

    def start_ray(self, head_address: str | None, token_path: Path) -> None:
        env = self.env(token_path)
        ports = {"dashboard_agent": _free_port(), "dashboard": _free_port(), "client": _free_port()}
        cmd = ray_start_command(head_address=head_address, node_ip=node_ip_address(self.num_tasks > 1),
                                cpus=self.spec.cpus_per_node, gpus=self.spec.gpus_per_node, temp_dir=self.temp_dir,
                                ports=ports, mem_bytes=node_memory_bytes(), ray=_ray_executable())
        self.log = self.dir / f"node{self.rank}-{socket.gethostname()}.log"
        print(f"{_LOG} node {self.rank} on {socket.gethostname()}: {' '.join(cmd)}  (log: {self.log})", flush=True)
        with open(self.log, "ab") as log:
            self.ray = self.spawn(cmd, env, stdout=log, stderr=subprocess.STDOUT)

    def check_ray(self, what: str) -> None:
        if self.ray is not None and self.ray.poll() is not None:
            raise RuntimeError(f"{what}: `ray start` on {socket.gethostname()} exited with status "
                               f"{self.ray.returncode}; its log {self.log} ends:\n{_tail(self.log)}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the driver and this node's Ray, then every process still marked as ours; remove the temp dir."""
        if self.stopped:
            return
        self.stopped = True
        _stop_process(self.driver, signal.SIGTERM, grace_s)
        _stop_process(self.ray, signal.SIGTERM, grace_s)  # ray start --block stops the processes it started
        left = kill_marked(self.temp_dir, grace_s=5.0)
        if left:
            print(f"{_LOG} {left} Ray process(es) of {self.temp_dir} survived SIGKILL", flush=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RaySweepJob(submitit.helpers.Checkpointable):
    """Checkpointable submitit callable, one task per node: ``RaySweepJob()(spec)`` (see the module doc).

    A requeued job runs the same call again: its task 0 resumes the sweep from ``spec.out``. Nothing
    of a running job is pickled (:meth:`checkpoint` resubmits a fresh instance with the same spec).
    """

    def __init__(self) -> None:
        self._node: _Node | None = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._node = None

    def __call__(self, spec: SweepSpec) -> dict:
        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        node = self._node = _Node(spec, str(env.job_id), restart, env.global_rank, env.num_tasks)
        node.dir.mkdir(parents=True, exist_ok=True)
        for earlier in range(restart):  # what an earlier run of this job may have left on this node
            kill_marked(f"{RAY_TMP_ROOT}/rfd{env.job_id}-{earlier}-", grace_s=5.0)
            shutil.rmtree(ray_temp_dir(str(env.job_id), earlier, env.global_rank), ignore_errors=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if in_submitit_job() else None
        try:
            if env.global_rank == 0:
                return self._head(node, env)
            return self._worker(node)
        except BaseException:
            if env.global_rank == 0 and not node.stopped:
                self._write_stop(node, "failed")
            raise
        finally:
            node.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    # ---- task 0

    def _head(self, node: _Node, env) -> dict:
        spec = node.spec
        node.dir.chmod(0o700)
        token = node.dir / "token"
        atomic_write(token, secrets.token_hex(32) + "\n", mode=0o600)
        node.start_ray(None, token)
        address_file = Path(node.temp_dir) / "ray_current_cluster"
        deadline = time.time() + 180
        while not (address_file.is_file() and address_file.read_text().strip()):
            node.check_ray("starting the Ray head")
            if time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start within 180 s; its log {node.log} ends:\n{_tail(node.log)}")
            time.sleep(0.5)
        address = address_file.read_text().strip()
        atomic_write(node.dir / "head.json", json.dumps({"address": address, "token": str(token), "job_id": node.job_id,
                                                         "restart": node.restart, "host": socket.gethostname(),
                                                         "hostnames": list(env.hostnames)}, indent=2))
        print(f"{_LOG} Ray head at {address}; waiting for {node.num_tasks} node(s)", flush=True)
        waiter = node.spawn([sys.executable, "-m", "facedis.cluster.ray_sweep", "wait-for-nodes", address,
                             str(node.num_tasks), str(spec.cpus_per_node), str(spec.gpus_per_node),
                             str(spec.join_timeout_s)], node.env(token), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        node.driver = waiter  # stopped with the node
        while waiter.poll() is None:
            if node.ray.poll() is not None:
                _stop_process(waiter)
                node.check_ray("waiting for the Ray nodes")
            time.sleep(0.5)
        stdout, stderr = waiter.communicate()
        node.driver = None
        if waiter.returncode != 0:
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            raise RuntimeError(lines[-1] if lines else f"waiting for the Ray nodes failed ({waiter.returncode})")
        nodes = json.loads(stdout.strip().splitlines()[-1])
        atomic_write(node.dir / "nodes.json", json.dumps(nodes, indent=2))
        print(f"{_LOG} {len(nodes)} Ray node(s) ready: "
              + ", ".join(f"{n['host']} {n['resources'].get('CPU', 0):g} CPU {n['resources'].get('GPU', 0):g} GPU"
                          for n in nodes), flush=True)

        resume = has_started(spec.out)
        if not resume and (spec.out / "sweep.json").is_file():  # stopped before Tune saved any state: start again
            os.replace(spec.out / "sweep.json", spec.out / f"sweep.json.unstarted-{node.job_id}-r{node.restart}")
        cmd = tune_command(spec, address, resume)
        print(f"{_LOG} {'resuming' if resume else 'starting'} the sweep: {' '.join(cmd)}", flush=True)
        node.driver = node.spawn(cmd, node.env(token), cwd=spec.cwd)
        while node.driver.poll() is None:
            if node.ray.poll() is not None:
                _stop_process(node.driver)
                node.check_ray("during the sweep")
            time.sleep(1.0)
        rc = node.driver.returncode
        node.driver = None
        progress = sweep_progress(spec.out)
        if rc != 0:
            raise RuntimeError(f"the sweep (facedis tune) exited with status {rc}; its output is above in this log")
        unfinished = progress["running"] + progress["pending"]
        if unfinished:
            raise RuntimeError(f"the sweep stopped with {unfinished} unfinished trial(s); submit the same command again "
                               "to resume it")
        summary = {"name": spec.name, "out": str(spec.out), "job_id": node.job_id, "restart": node.restart,
                   "nodes": nodes, "trials": progress["trials"], "done": progress["done"], "failed": progress["failed"],
                   "winner": progress["winner"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(finished_path(spec.run_dir), json.dumps(summary, indent=2, default=str))
        self._write_stop(node, "finished")
        print(f"{_LOG} sweep finished: {progress['done']} trials done, {progress['failed']} failed -> {spec.out}",
              flush=True)
        return summary

    @staticmethod
    def _write_stop(node: _Node, reason: str) -> None:
        try:
            atomic_write(node.dir / "stop.json", json.dumps({"reason": reason, "time": time.time()}))
        except OSError:
            pass

    # ---- the other tasks

    def _worker(self, node: _Node) -> dict:
        spec = node.spec
        head_file, stop_file = node.dir / "head.json", node.dir / "stop.json"
        deadline = time.time() + spec.join_timeout_s + 180
        while not head_file.is_file():
            if stop_file.is_file():
                return {"rank": node.rank, "host": socket.gethostname(), "stopped": read_json(stop_file)}
            if time.time() > deadline:
                raise RuntimeError(f"no Ray head address in {head_file} after {spec.join_timeout_s + 180:g} s")
            time.sleep(0.5)
        head = read_json(head_file) or {}
        node.start_ray(head["address"], Path(head["token"]))
        while not stop_file.is_file():
            node.check_ray(f"Ray worker joined to {head['address']}")
            time.sleep(1.0)
        stop = read_json(stop_file) or {}
        print(f"{_LOG} node {node.rank}: the head says {stop.get('reason')!r}; stopping Ray on this node", flush=True)
        node.stop()
        if stop.get("reason") == "interrupted":
            wait_to_be_killed()  # not finished: write no result, the requeued job starts again
        return {"rank": node.rank, "host": socket.gethostname(), "stopped": stop.get("reason")}

    # ---- signals

    def _on_sigterm(self, signum, frame) -> None:
        """Slurm cancels, requeues or preempts the job (every process of the job got SIGTERM): stop Ray
        on this node and write no result; the job is not finished."""
        node = self._node
        print(f"{_LOG} SIGTERM on {socket.gethostname()}: stopping Ray on this node", flush=True)
        if node is not None:
            if node.rank == 0:
                self._write_stop(node, "interrupted")
            node.stop(grace_s=2.0)
        wait_to_be_killed()

    def checkpoint(self, spec: SweepSpec) -> submitit.helpers.DelayedSubmission:
        """Preemption or timeout (submitit's USR2 handler, task 0): stop the sweep so that Ray Tune saves its
        state (SIGINT to the driver), stop Ray everywhere, then requeue a fresh job with the same spec."""
        node = self._node
        print(f"{_LOG} preempted/timed out: stopping the sweep and Ray; the requeued job resumes the sweep", flush=True)
        if node is not None and not node.stopped:
            _stop_process(node.driver, signal.SIGINT, spec.stop_grace_s)
            self._write_stop(node, "interrupted")
            node.stop()
        return submitit.helpers.DelayedSubmission(RaySweepJob(), spec)


def _main(argv: Sequence[str]) -> int:
    """``python -m facedis.cluster.ray_sweep wait-for-nodes ADDRESS COUNT CPUS GPUS TIMEOUT_S``: the nodes as JSON."""
    if len(argv) != 6 or argv[0] != "wait-for-nodes":
        print("usage: python -m facedis.cluster.ray_sweep wait-for-nodes ADDRESS COUNT CPUS GPUS TIMEOUT_S",
              file=sys.stderr)
        return 2
    try:
        nodes = wait_for_nodes(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5]))
    except RuntimeError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(nodes))
    return 0


def describe(spec: SweepSpec) -> str:
    return (f"{spec.nodes} node(s) x ({spec.cpus_per_node} CPUs, {spec.gpus_per_node} GPUs): "
            f"facedis tune {' '.join(spec.tune_argv)} --address <head> --out {spec.out}")


__all__: Sequence[str] = ("SweepSpec", "RaySweepJob", "sweep_progress", "ray_temp_dir", "ray_start_command",
                          "tune_command", "memory_options", "node_memory_bytes", "has_started", "kill_marked",
                          "marked_pids", "wait_for_nodes", "describe")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
