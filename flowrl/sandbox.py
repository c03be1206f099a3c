"""Run untrusted (model-written) programs: one process tree per program, contained and bounded.

    box = Sandbox(Limits(cpu_s=2, wall_s=4))
    res = box.run({"main.py": src}, ["main.py"], stdin=b"1 2\n")     # one program
    results = box.map(jobs)                                          # a pool, sized to the cores

Each program gets (as root, which is how the trainer runs here; ``box.isolation`` says what is on):

- **Its own process tree, killed as a whole.** ``subprocess.Popen(start_new_session=True)`` starts a
  trusted launcher (``python -I -S -B -c _LAUNCHER``) in a new session; the launcher enters new
  network, mount and PID namespaces (``unshare(2)`` through ctypes: Python 3.11 has no ``os.unshare``)
  and forks the namespace's init, which forks the program. When the init exits (the program is done) or
  dies (``PR_SET_PDEATHSIG`` ties it to the launcher), the kernel kills every process left in the PID
  namespace: a program that ``setsid()``s or daemonizes cannot outlive its run. On the wall-time limit
  the parent SIGKILLs the launcher's process group; afterwards it also SIGKILLs anything still running
  under the run's uid (defence in depth; never needed in the tests).
- **An unprivileged uid of its own.** Every concurrent run leases a distinct uid (``uid_range(pid)``:
  2**31 + 256 * the trainer's pid + slot, no passwd entry needed; distinct across ranks and processes), so RLIMIT_NPROC (which the kernel does not enforce for root, and counts per
  uid) bounds *this* program's processes only -- a fork bomb in one run cannot starve another, so results
  do not depend on the pool size -- and the program can signal no process but its own: ``os.kill`` of
  the trainer (root) fails with EPERM. ``PR_SET_NO_NEW_PRIVS`` stops set-uid binaries (su, sudo).
- **A private file system view.** In the mount namespace ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` (the only world-writable directories on this machine) are fresh size-capped tmpfs that
  vanish with the run; the program's files are copied into ``/tmp/box`` (cwd, HOME, TMPDIR); everything
  else is owned by root and read-only to the program's uid, so nothing outside the sandbox changes.
  ``/proc`` is an empty read-only tmpfs (no ``/proc/self/mem``, no view of the trainer's processes). The
  Python install is bind-mounted read-only at ``/tmp/.python`` (here it lives under ``/root``, mode 700).
- **No network.** A new, empty network namespace (not even loopback is up): ``connect`` fails with
  ENETUNREACH, including to listeners on the host's 127.0.0.1.
- **Resource limits** (``setrlimit`` in the init, inherited): RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC,
  RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE=0; wall time enforced by the parent; stdout/stderr read by
  the parent through ``selectors`` in chunks, keeping at most ``output_bytes`` each (the rest is drained
  and dropped), so a program printing forever costs the parent bounded memory.
- **A scrubbed environment**: ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and ``PYTHONHASHSEED=0`` only
  (the launcher itself also starts with an empty environment); Python runs with ``-I -S -B``.

Without root, or where the kernel refuses namespaces (``isolation`` lists what was granted), runs degrade
to: own session and process group, rlimits, fresh temp dir, scrubbed env, bounded output -- and NOT
enforced: network isolation, RLIMIT_NPROC (shared with the trainer's uid), protection of the trainer's
files and processes from the program (same uid). ``Sandbox(require_isolation=True)`` refuses to run then.

An external sandbox service plugs in as ``Sandbox(executor=fn)``: ``fn(Job) -> Result`` replaces the
local launcher (e.g. an HTTP client for a remote sandbox); the pool and everything above it are unchanged.
"""
from __future__ import annotations

import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

# The launcher runs as root in a fresh interpreter (no threads, nothing imported but the stdlib), so
# everything that must happen between fork and exec happens in plain sequential code rather than in a
# preexec_fn (which the subprocess docs call unsafe in a threaded parent -- our pool is threaded).
_LAUNCHER = r'''
import ctypes, json, os, resource, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def fail(what):
    e = ctypes.get_errno()
    os.write(2, ("sandbox launcher: %s failed: %s\n" % (what, os.strerror(e))).encode())
    os._exit(125)
def mount(src, dst, fstype, flags, data):
    if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                  data and data.encode()) != 0:
        fail("mount %s" % dst)
files = {}
for name in os.listdir("."):
    with open(name, "rb") as f:
        files[name] = f.read()
ns = spec["namespaces"]
flags = (0x40000000 if "net" in ns else 0) | (0x00020000 if "mount" in ns else 0) | (0x20000000 if "pid" in ns else 0)
if flags and libc.unshare(flags) != 0:
    fail("unshare")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
python, env, uid = spec["python"], spec["env"], spec["uid"]
if "mount" in ns:
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount propagates to the host
    for d in spec["hide"]:
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=1777" % spec["tmpfs_kb"])
    os.mkdir("/tmp/.python")
    mount(spec["prefix"], "/tmp/.python", None, MS_BIND | MS_REC, None)
    mount(None, "/tmp/.python", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)
    python = "/tmp/.python/" + spec["python_rel"]
    env["LD_LIBRARY_PATH"] = "/tmp/.python/lib"  # libpython's RUNPATH may point under /root
    box = "/tmp/box"
    os.mkdir(box, 0o700)
    for name, data in files.items():
        with open(os.path.join(box, name), "wb") as f:
            f.write(data)
    if uid is not None:
        for name in [box] + [os.path.join(box, n) for n in files]:
            os.chown(name, uid, uid)
    os.chdir(box)
else:
    box = os.getcwd()
    if uid is not None:  # the parent's fresh temp dir (mode 700), handed to the run's uid
        for name in ["."] + list(files):
            os.chown(name, uid, uid)
env["HOME"] = env["TMPDIR"] = box
pid = os.fork()
if pid:  # the launcher: wait for the namespace's init and report its status
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
# the init of the new PID namespace (pid 1 there)
if "pid" in ns and "mount" in ns:  # an empty /proc: no /proc/self/mem, no view of other processes
    mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k")
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("prctl(NO_NEW_PRIVS)")
if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG=SIGKILL: set after setuid (credential changes clear it)
child = os.fork()
if child == 0:
    os.execve(python, [python, "-I", "-S", "-B"] + spec["argv"], env)
while True:  # pid 1 reaps every orphan; its exit makes the kernel kill whatever is left
    try:
        p, status = os.wait()
    except ChildProcessError:
        os._exit(125)
    if p == child:
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''

_HIDE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@dataclass
class Limits:
    cpu_s: int = 4
    """RLIMIT_CPU per process (seconds of CPU); the kernel sends SIGXCPU, then SIGKILL."""
    wall_s: float = 6.0
    """Wall-clock limit of the whole run, enforced by the parent (sleeping programs use no CPU)."""
    memory_mb: int = 512
    """RLIMIT_AS per process (address space: Python itself needs ~30 MB; 512 MB fits numpy-free code)."""
    nproc: int = 16
    """RLIMIT_NPROC: processes (threads count too) of the run's uid, the namespace's init included."""
    nofile: int = 64
    """RLIMIT_NOFILE: open file descriptors per process."""
    fsize_mb: int = 8
    """RLIMIT_FSIZE: largest file a process may write."""
    tmpfs_mb: int = 32
    """Size of each private tmpfs (the box dir lives in the one on /tmp)."""
    output_bytes: int = 64 * 1024
    """Bytes of stdout (and of stderr, and of the verdict channel) kept; the rest is read and dropped."""

    def __post_init__(self):
        for name in ("cpu_s", "wall_s", "memory_mb", "nproc", "nofile", "fsize_mb", "tmpfs_mb", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name}={getattr(self, name)} must be > 0.")
        if self.nproc < 2:
            raise ValueError(f"Limits.nproc={self.nproc} must be >= 2 (the namespace's init and the program).")


@dataclass
class Job:
    files: Dict[str, str]
    """File name (no directories) -> text, written into the run's fresh directory."""
    argv: List[str]
    """Arguments of `python -I -S -B`, e.g. ["main.py"]."""
    stdin: bytes = b""
    """Bytes fed to the program's stdin (then EOF)."""
    channel: bool = False
    """Open a verdict pipe: its write end's fd number is appended to argv (for a trusted harness)."""


@dataclass
class Result:
    returncode: Optional[int]
    """Exit status (128 + signal when killed by one); None if the parent killed it at the wall limit."""
    stdout: bytes = b""
    stderr: bytes = b""
    verdict: bytes = b""
    """What arrived on the verdict pipe (Job.channel)."""
    timed_out: bool = False
    truncated: bool = False
    """Some output beyond Limits.output_bytes was dropped."""
    wall_s: float = 0.0
    error: str = ""
    """Why the run did not happen (launcher failure, executor exception); '' otherwise."""


Executor = Callable[[Job], Result]


class Sandbox:
    """Runs Jobs under Limits; ``map`` runs many on a thread pool of ``workers`` (0 = the cores)."""

    def __init__(self, limits: Optional[Limits] = None, workers: int = 0, *, uid_base: Optional[int] = None,
                 executor: Optional[Executor] = None, require_isolation: bool = False):
        self.limits = limits or Limits()
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0 (0 = one per CPU core).")
        self.workers = workers or len(os.sched_getaffinity(0))
        self.executor = executor
        self.root = os.geteuid() == 0
        # one uid per concurrent run (see the module docstring): a queue of free slots. Default range:
        # 2**31 + pid * 256 (pid < 2**22 on Linux), so that trainer ranks (one Sandbox per process) and
        # concurrent test processes never share a uid, and a uid above every real account's
        # (each Sandbox of a process takes its own uids from that range, so two never share one)
        if self.workers > UIDS_PER_PROCESS // 2:
            raise ValueError(f"workers={self.workers} must be <= {UIDS_PER_PROCESS // 2}.")
        self.uid_base = uid_range(os.getpid())[0] if uid_base is None else uid_base
        self._slots: "queue.Queue[int]" = queue.Queue()
        for _ in range(self.workers):
            self._slots.put(self._fresh_uid() if uid_base is None else uid_base + self._slots.qsize())
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self.isolation = self._probe() if executor is None else ["external"]
        if require_isolation and executor is None and not {"uid", "net", "mount", "pid"} <= set(self.isolation):
            raise RuntimeError(f"Sandbox(require_isolation=True): only {self.isolation} available here "
                               "(needs root and unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID)).")

    def _fresh_uid(self) -> int:
        global _UID_NEXT
        with _UID_LOCK:
            _UID_NEXT = (_UID_NEXT + 1) % UIDS_PER_PROCESS
            return uid_range(os.getpid())[0] + _UID_NEXT

    # -- capability probe ---------------------------------------------------------------------------
    def _probe(self) -> List[str]:
        """Which protections the kernel grants here: try the full set once, degrade if refused."""
        base = ["session", "rlimits", "tmpdir", "env"]
        if not self.root:
            return base
        self._namespaces = ["net", "mount", "pid"]
        r = self._run_local(Job({"p.py": "print(1)"}, ["p.py"]))
        if r.returncode == 0 and r.stdout.strip() == b"1":
            return base + ["uid", "net", "mount", "pid"]
        self._namespaces = []
        r = self._run_local(Job({"p.py": "print(1)"}, ["p.py"]))
        if r.returncode != 0 or r.stdout.strip() != b"1":  # e.g. the interpreter lives under /root (mode 700)
            raise RuntimeError("Sandbox: unshare() is refused here and the run's uid cannot start "
                               f"{sys.executable} ({r.error or r.stderr.decode(errors='replace')[-300:]}); "
                               "install Python where other users can execute it, or allow namespaces.")
        return base + ["uid"]

    # -- running ------------------------------------------------------------------------------------
    def run(self, files: Dict[str, str], argv: Sequence[str], stdin: bytes = b"", channel: bool = False) -> Result:
        return self.submit(Job(dict(files), list(argv), stdin, channel))

    def submit(self, job: Job) -> Result:
        """One job, in the calling thread. Never raises for anything the program does."""
        for name in job.files:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"Job file name {name!r} must be a plain name (no '/', not hidden).")
        if self.executor is not None:
            try:
                return self.executor(job)
            except Exception as e:  # a broken service is a failed run, not a dead trainer
                return Result(None, error=f"executor: {type(e).__name__}: {e}")
        return self._run_local(job)

    def map(self, jobs: Sequence[Job]) -> List[Result]:
        """Results in job order; each job is independent of the others and of the pool size."""
        if len(jobs) <= 1 or self.workers == 1:
            return [self.submit(j) for j in jobs]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        return list(self._pool.map(self.submit, jobs))

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _spec(self, job: Job, uid: Optional[int], fd: Optional[int]) -> dict:
        lim = self.limits
        prefix = os.path.realpath(sys.base_prefix)
        exe = os.path.realpath(sys.executable)
        return {
            "namespaces": getattr(self, "_namespaces", []), "uid": uid, "hide": list(_HIDE),
            "tmpfs_kb": lim.tmpfs_mb * 1024, "prefix": prefix, "python": exe,
            "python_rel": os.path.relpath(exe, prefix),
            "argv": list(job.argv) + ([str(fd)] if fd is not None else []),
            "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
            "rlimits": {"RLIMIT_CPU": lim.cpu_s, "RLIMIT_AS": lim.memory_mb << 20, "RLIMIT_NPROC": lim.nproc,
                        "RLIMIT_NOFILE": lim.nofile, "RLIMIT_FSIZE": lim.fsize_mb << 20, "RLIMIT_CORE": 0},
        }

    def _run_local(self, job: Job) -> Result:
        lim = self.limits
        uid = self._slots.get() if self.root else None
        work = tempfile.mkdtemp(prefix="flowrl-sandbox-")
        r_fd = w_fd = None
        t0 = time.monotonic()
        try:
            for name, text in job.files.items():
                with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                    f.write(text)
            if not self.root:  # no namespaces: the program works in `work` directly
                os.chmod(work, 0o700)
            if job.channel:
                r_fd, w_fd = os.pipe()
            spec = self._spec(job, uid, w_fd)
            try:
                proc = subprocess.Popen(
                    [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _LAUNCHER, json.dumps(spec)]
                    if self.root else
                    [os.path.realpath(sys.executable), "-I", "-S", "-B"] + spec["argv"],
                    cwd=work, env=spec["env"] | {"HOME": work, "TMPDIR": work} if not self.root else {},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=(w_fd,) if w_fd is not None else (), start_new_session=True,
                    preexec_fn=None if self.root else _limit_self(spec["rlimits"]))
            except OSError as e:
                return Result(None, error=f"launch: {e}")
            if w_fd is not None:
                os.close(w_fd)
                w_fd = None
            res = _collect(proc, job.stdin, r_fd, lim, t0, uid)
            if res.returncode == 125 and b"sandbox launcher:" in res.stderr:
                res.error = res.stderr.decode(errors="replace").strip()
            return res
        finally:
            for fd in (r_fd, w_fd):
                if fd is not None:
                    os.close(fd)
            if uid is not None:
                if _kill_uid(uid):  # a zombie we cannot reap still counts against RLIMIT_NPROC:
                    uid = self._fresh_uid()  # retire the uid, so later runs start from the same count
                self._slots.put(uid)
            shutil.rmtree(work, ignore_errors=True)


UIDS_PER_PROCESS = 256
_UID_LOCK = threading.Lock()
_UID_NEXT = -1


def uid_range(pid: int) -> range:
    """The uids the Sandboxes of process ``pid`` run programs as (by default)."""
    return range(2 ** 31 + pid * UIDS_PER_PROCESS, 2 ** 31 + (pid + 1) * UIDS_PER_PROCESS)


def _limit_self(rlimits: Dict[str, int]) -> Callable[[], None]:
    """preexec_fn for the unprivileged fallback (no launcher): only setrlimit, nothing that allocates."""
    import resource
    pairs = [(getattr(resource, k), v) for k, v in rlimits.items() if k != "RLIMIT_NPROC"]

    def apply():
        for what, v in pairs:
            resource.setrlimit(what, (v, v))
    return apply


def _collect(proc: subprocess.Popen, stdin: bytes, r_fd: Optional[int], lim: Limits, t0: float,
             uid: Optional[int]) -> Result:
    """Feed stdin, read stdout/stderr/verdict with a bound, enforce the wall limit; always reaps."""
    sel = selectors.DefaultSelector()
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "verdict": bytearray()}
    truncated = timed_out = False
    fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    if r_fd is not None:
        fds[r_fd] = "verdict"
    for fd in fds:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    in_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    deadline = t0 + lim.wall_s
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the pipes are held by something else: the run is over anyway
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                fd = key.fd
                if fd == in_fd:
                    try:
                        n = os.write(fd, pending[:65536])
                        pending = pending[n:]
                    except (BrokenPipeError, BlockingIOError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fds[fd]]
                room = lim.output_bytes - len(buf)
                if len(chunk) > room:
                    truncated = True
                buf += chunk[:max(room, 0)]
    finally:
        sel.close()
        if uid is not None:
            # kill the program's processes (the namespace's init among them) and let the root launcher
            # reap its init and exit: killing the launcher first would orphan the init to the host's
            # pid 1, which here never reaps it (a zombie of the run's uid that counts against RLIMIT_NPROC)
            _kill_uid(uid)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc)
    rc = proc.returncode
    if rc is not None and rc < 0:
        rc = 128 - rc
    return Result(None if timed_out else rc, bytes(bufs["stdout"]), bytes(bufs["stderr"]), bytes(bufs["verdict"]),
                  timed_out, truncated, time.monotonic() - t0)


def _kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session leader's pgid == its pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f.close()
        except OSError:
            pass


def _kill_uid(uid: int, rounds: int = 100) -> bool:
    """SIGKILL every live process of ``uid`` until none is left; True if zombies of it remain (their
    parent has not reaped them yet)."""
    zombies = False
    for _ in range(rounds):
        found, zombies = False, False
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.stat(f"/proc/{d}").st_uid != uid:
                    continue
                with open(f"/proc/{d}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
                if state in (b"Z", b"X"):
                    zombies = True
                    continue
                os.kill(int(d), signal.SIGKILL)
                found = True
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
                pass
        if not found:
            break
        time.sleep(0.005)
    if zombies:  # the launcher reaps its init a moment after the kill: look once more
        time.sleep(0.05)
        zombies = any(_is_zombie_of(d, uid) for d in os.listdir("/proc") if d.isdigit())
    return zombies


def _is_zombie_of(pid: str, uid: int) -> bool:
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (FileNotFoundError, IndexError):
        return False


_DEFAULT: Dict[tuple, Sandbox] = {}


def default(limits: Optional[Limits] = None, workers: int = 0) -> Sandbox:
    """A process-wide sandbox per (limits, workers) (the probe runs once)."""
    key = (tuple(asdict(limits or Limits()).items()), workers)
    if key not in _DEFAULT:
        _DEFAULT[key] = Sandbox(limits, workers)
    return _DEFAULT[key]
