"""A throwaway single-node SLURM cluster on this machine, for the workflow's cluster test.

Debian's packages are installed when missing (root only). Everything the cluster writes lives in one
temporary folder: its own MUNGE daemon (private key and socket, so a system munged is never touched),
a slurm.conf on free ports, and the controller and node daemons running in the foreground. No systemd,
no cgroups and no accounting database are needed: processes are tracked with proctrack/linuxproc and
job states come from `squeue` (the controller keeps finished jobs for `MinJobAge` seconds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PACKAGES", "Cluster", "ClusterError", "ClusterUnavailable", "ensure_installed", "running_cluster"]

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# The programs the cluster needs; Debian puts the daemons in /usr/sbin.
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol", "munged", "mungekey")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Jobs stay visible to `squeue` this long after they end; the SLURM executor needs at least three
# times its first status-check delay, else it falls back to `sacct` (which needs accounting).
MIN_JOB_AGE = 600
MIN_NODE_MEMORY_MB = 32000
# Job credentials' lifetime in seconds; a requeued job waits this long before it starts again.
CRED_EXPIRE = 20
# Device files that stand for GPUs: SLURM wants one file per GPU.
PRETEND_GPUS = ("/dev/null", "/dev/zero", "/dev/full")


class ClusterUnavailable(RuntimeError):
    """SLURM is missing and cannot be installed here (the test skips with this message)."""


class ClusterError(RuntimeError):
    """SLURM is installed but the cluster did not come up or a client command failed (a real failure)."""


def which(program: str) -> str | None:
    """The program's path on PATH or in the sbin folders (root's PATH may lack them)."""
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


def _apt_get(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=900)


@contextlib.contextmanager
def _no_service_starts() -> Iterator[None]:
    """Keep package scripts from starting daemons (there is no init system to run them under)."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def ensure_installed() -> None:
    """Install the SLURM and MUNGE packages with apt-get when a program is missing.

    Raises:
        ClusterUnavailable: not root, no apt-get, or the install failed (the message says why).
    """
    missing = [p for p in PROGRAMS if which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM programs {missing} are missing and installing them needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM programs {missing} are missing and there is no apt-get to install them")
    log.info("installing %s", " ".join(PACKAGES))
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    with _no_service_starts():
        result = _apt_get(*install)
        if result.returncode != 0:  # e.g. no package lists yet on a fresh image
            _apt_get("update")
            result = _apt_get(*install)
    still_missing = [p for p in PROGRAMS if which(p) is None]
    if result.returncode != 0 or still_missing:
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """Physical memory in MB (from /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("/proc/meminfo has no MemTotal line")


SLURM_CONF = """\
ClusterName=sraseg-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: plain process tracking and no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Use the node as written here even if the hardware reports something else.
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge={min_job_age}
InactiveLimit=0
KillWait=5
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running single-node cluster; `env` is what every SLURM client command needs."""

    root: Path
    bin_dir: Path
    env: dict[str, str]
    cpus: int
    memory_mb: int
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        program = which(cmd[0]) or cmd[0]
        result = subprocess.run([program, *cmd[1:]], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {result.stderr.strip()}\n{self.logs()}")
        return result

    def job_ids(self, states: str = "all") -> list[str]:
        """Ids of the jobs the controller knows in `states` ("all" includes jobs ended within MinJobAge)."""
        out = self.run("squeue", "--noheader", f"--states={states}", "--format=%i").stdout
        return out.split()

    def jobs(self) -> list[dict[str, str]]:
        """`scontrol show job` of every job the controller knows, as key -> value (JobId, Comment, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job").stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]

    def logs(self, tail: int = 3000) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"== {path}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _start(cluster: Cluster, *cmd: str) -> subprocess.Popen:
    """Start a daemon in the foreground (its own process group, so teardown reaches its children)."""
    with open(cluster.root / f"{Path(cmd[0]).name}.out", "w") as out:  # the daemon keeps its own copy
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    cluster.processes.append(proc)
    return proc


def _wait(what: str, ready, cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in cluster.processes:
            if proc.poll() is not None:
                raise ClusterError(f"{proc.args[0]} exited with {proc.returncode}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out waiting for {what}\n{cluster.logs()}")


def _node_idle(cluster: Cluster) -> bool:
    result = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
    return result.returncode == 0 and result.stdout.split() == ["idle"]


def _stop(cluster: Cluster) -> None:
    """Cancel our jobs by id, then stop each daemon we started by its process id."""
    if cluster.processes and all(p.poll() is None for p in cluster.processes):
        with contextlib.suppress(Exception):
            ids = cluster.job_ids(states="pending,running,suspended,completing,configuring")
            if ids:
                cluster.run("scancel", *ids, check=False)
    for proc in reversed(cluster.processes):  # slurmd, slurmctld, then munged
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def running_cluster(root: Path, cpus: int = 2, gpus: int = 1) -> Iterator[Cluster]:
    """Bring a cluster up in `root` (an empty folder), yield it, and always tear it down.

    The node offers `cpus` CPUs and `gpus` pretend GPUs: a `gpu` GRES backed by /dev/null (then /dev/zero,
    /dev/full), so that `sbatch --gpus=1` is accepted and scheduled (`gpus` GPU jobs at a time) while the
    job itself finds no CUDA device and runs on the CPU.

    Args:
        root: folder for the configuration, keys, sockets, spool, state and logs (left in place).
        cpus: CPUs of the node (sbatch refuses jobs asking for more).
        gpus: pretend GPUs of the node.
    Yields:
        The running cluster.
    Raises:
        ClusterUnavailable: the packages are missing and cannot be installed.
        ClusterError: a daemon did not come up.
    """
    ensure_installed()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses a socket folder others can write to
    for sub in ("ctld", "slurmd"):
        (root / sub).mkdir()
    # A bit below the machine's memory, but room for the rules' largest request (16 GB) on a small
    # CI machine: memory is neither a consumable (CR_Core) nor enforced (no cgroups) here.
    memory = max(int(_memory_mb() * 0.9), MIN_NODE_MEMORY_MB)
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=socket.gethostname().split(".")[0],
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=root / "munge.socket",
            cred_expire=CRED_EXPIRE,
            state=root,
            min_job_age=MIN_JOB_AGE,
            cpus=cpus,
            memory=memory,
            gpus=gpus,
        )
    )
    if not 1 <= gpus <= len(PRETEND_GPUS):
        raise ValueError(f"gpus={gpus}: between 1 and {len(PRETEND_GPUS)} pretend GPUs")
    (root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={','.join(PRETEND_GPUS[:gpus])}\n")
    # The SLURM jobstep executor drops every SLURM_* variable, SLURM_CONF included, before it calls
    # srun inside a job; a real cluster keeps its configuration in /etc/slurm, this one in `root`
    # (so nothing of the system's is touched), hence an srun that is told again where it is.
    bin_dir = root / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec "{which("srun")}" "$@"\n')
    srun.chmod(0o755)
    env = dict(os.environ, SLURM_CONF=str(conf))
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", ""), *SBIN])
    cluster = Cluster(root=root, bin_dir=bin_dir, env=env, cpus=cpus, memory_mb=memory)
    try:
        key = root / "munge.key"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        _start(
            cluster,
            which("munged"),
            "--foreground",
            "--force",  # root-owned private key and socket in a temp folder: fine for a test
            f"--key-file={key}",
            f"--socket={root / 'munge.socket'}",
            f"--pid-file={root / 'munged.pid'}",
            f"--log-file={root / 'munged.log'}",
            f"--seed-file={root / 'munged.seed'}",
        )
        _wait("munged", lambda: (root / "munge.socket").exists(), cluster)
        _start(cluster, which("slurmctld"), "-D", "-i", "-f", str(conf))
        _wait("slurmctld", lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, cluster)
        _start(cluster, which("slurmd"), "-D", "-N", "localhost", "-f", str(conf))
        _wait("the node to become idle", lambda: _node_idle(cluster), cluster, timeout=90)
        yield cluster
    finally:
        _stop(cluster)
