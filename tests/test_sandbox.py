"""Hostile programs against flowrl/sandbox.py and the code task's harness: every one scores 0, the
parent (this pytest process) survives and is never blocked past the wall limit, and nothing outside
the sandbox changes. Correct programs score 1. Each run is bounded by Limits(wall_s=2.5)."""
from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from flowrl import code_task, sandbox

LIMITS = sandbox.Limits(cpu_s=1, wall_s=2.5, memory_mb=256, output_bytes=4096)
ADD = {"id": "add", "prompt": "Write add(a, b).", "entry_point": "add",
       "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]}
SUM_LINE = {"id": "sum_line", "prompt": "Print the sum of two ints.",
            "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0\n"}]}
GOOD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def box():
    b = sandbox.Sandbox(LIMITS, workers=2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def task(box):
    t = code_task.CodeTask([ADD, SUM_LINE], "", {})
    t.sandbox = box  # the test limits (a short wall time) instead of the task's defaults
    return t


def fenced(code: str) -> str:
    return "Here you go:\n```python\n" + code + "\n```\n"


def score(task, code: str, problem: int = 0):
    rewards, metrics = task.score([task[problem]], [fenced(code)])
    return rewards[0], metrics


def sandbox_uids_alive() -> list:
    mine = sandbox.uid_range(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid in mine:
                    out.append(int(d))
            except FileNotFoundError:
                pass
    return [(p, open(f"/proc/{p}/stat").read()[:60]) for p in out if os.path.exists(f"/proc/{p}")]


def test_isolation_is_full_here(box):
    # this machine runs the trainer as root with namespaces allowed: everything in the docstring is on
    assert os.geteuid() == 0
    assert {"uid", "net", "mount", "pid", "rlimits", "env"} <= set(box.isolation), box.isolation


def test_correct_programs_score_one(task):
    r, m = score(task, GOOD)
    assert r == 1.0 and m["tests_passed"] == 1.0 and m["code_found"] == 1.0
    assert score(task, "import math\n\ndef add(a, b):\n    return math.fsum([a, b]) // 1 if False else a + b")[0] == 1.0
    assert score(task, "a, b = map(int, input().split())\nprint(a + b)", problem=1)[0] == 1.0
    r, m = score(task, "def add(a, b):\n    return a + b if a != 10 else 0")
    assert r == 0.0 and m["tests_passed"] == pytest.approx(2 / 3)  # the fraction is a metric only
    r, m = score(task, "print(0)", problem=1)
    assert r == 0.0 and m["tests_passed"] == 0.5


# hostile programs: each defines a CORRECT add where it can, so a 0 proves the trick was stopped
HOSTILE = {
    "infinite_loop": "while True:\n    pass\n" + GOOD,
    "sleep_forever": "import time\ntime.sleep(1000)\n" + GOOD,
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n" + GOOD,
    "fork_bomb_setsid": "import os\nfor _ in range(8):\n    if os.fork() == 0:\n        os.setsid()\n        while True: pass\n"
                        + GOOD,
    "memory_hog": "x = bytearray(10 ** 10)\n" + GOOD,
    "memory_creep": "xs = []\nwhile True:\n    xs.append(' ' * 10 ** 6)\n" + GOOD,
    "huge_output": "while True:\n    print('x' * 10000)\n" + GOOD,
    "recursion_bomb": "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)\n" + GOOD,
    "os_exit_early": GOOD + "import os\nos._exit(0)\n",
    "sys_exit_early": GOOD + "import sys\nsys.exit(0)\n",
    "raise_systemexit_in_function": "def add(a, b):\n    raise SystemExit(0)\n",
    "close_all_fds": GOOD + "import os\nos.closerange(0, 256)\n",
    "print_pass": "print('PASS')\nprint('3 3')\nimport os\nos._exit(0)\n",
    "write_fake_verdicts": GOOD + "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'0' * 32 + b' 3 3\\n')\n"
                           "    except OSError: pass\nos._exit(0)\n",
    "kill_parent": GOOD + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "killpg": GOOD + "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill_everyone": GOOD + "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "always_equal": "class Eq:\n    def __eq__(self, other): return True\n    __hash__ = None\n"
                    "def add(a, b):\n    return Eq()\n",
    "int_subclass_equal": "class I(int):\n    def __eq__(self, other): return True\ndef add(a, b):\n    return I(0)\n",
    "patch_exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return -7\n",
    "patch_assertion": "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})\n"
                       "builtins.isinstance = lambda *a: True\ndef add(a, b):\n    return -7\n",
    "patch_sys_exit": "import sys\nsys.exit = lambda *a: None\nimport os\nos._exit = lambda *a: None\ndef add(a, b):\n    return -7\n",
    "steal_nonce_frames": "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f:\n        print(f.f_locals)\n"
                          "        f = f.f_back\n    return 0\n",
    "steal_nonce_traceback": "def add(a, b):\n    try:\n        1 / 0\n    except Exception as e:\n"
                             "        f = e.__traceback__.tb_frame.f_back\n        print(f.f_locals)\n    return 0\n",
    "steal_nonce_gc": "import gc\ndef add(a, b):\n    for o in gc.get_objects():\n        pass\n    return 0\n",
    "proc_self_mem": "def add(a, b):\n    open('/proc/self/mem', 'rb')\n    return 0\n",
    "ctypes_poke": "import ctypes\nctypes.string_at(0)\n" + GOOD,
    "ctypes_libc": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.exit(0)\n" + GOOD,
    "pickle_payload": "import pickle\npickle.loads(b\"cos\\nsystem\\n(S'true'\\ntR.\")\n" + GOOD,
    "marshal_code": "import marshal\nexec(marshal.loads(marshal.dumps(compile('x = 1', 's', 'exec'))))\n" + GOOD,
    "thread_races_harness": "import threading, time\nthreading.Thread(target=time.sleep, args=(1,)).start()\n" + GOOD,
    "subprocess": "import subprocess\nsubprocess.run(['true'])\n" + GOOD,
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)\n" + GOOD,
    "read_tests_from_disk": "import os\nprint(open('tests.json').read())\n" + GOOD,
    "syntax_error": "def add(a, b) return a + b\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero(task, name):
    t0 = time.monotonic()
    r, m = score(task, HOSTILE[name])
    assert r == 0.0 and m["tests_passed"] == 0.0, name
    assert time.monotonic() - t0 < LIMITS.wall_s + 3.0  # the parent is never held past the wall limit
    assert os.getpid() and not sandbox_uids_alive()  # we are alive; nothing of the run is left running


def test_hostile_batch_does_not_stop_scoring(task):
    # a whole rollout batch of hostile programs and correct ones, scored at once on the pool
    names = ["fork_bomb", "infinite_loop", "huge_output", "kill_everyone", "os_exit_early"]
    rewards, _ = task.score([task[0]] * (len(names) + 2), [fenced(HOSTILE[n]) for n in names] + [fenced(GOOD)] * 2)
    assert rewards == [0.0] * len(names) + [1.0, 1.0]


def test_results_do_not_depend_on_pool_size():
    # each outcome is decided by a limit, never by timing (a busy loop could meet the CPU or the wall
    # limit first on a loaded machine): the fork count is RLIMIT_NPROC minus the init and the program,
    # whatever runs beside it -- with a uid shared between concurrent runs it would vary
    forks = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(100)\n"
             "        n += 1\nexcept OSError:\n    print(n)\n")
    jobs = [sandbox.Job({"m.py": src}, ["m.py"]) for src in (
        "print(1)", forks, "print(sum(range(10)))", "import time\ntime.sleep(100)", forks,
        "import sys\nprint(sys.argv)", "x = bytearray(10 ** 10)", forks)]
    outs = []
    for workers in (1, 2, 4):
        b = sandbox.Sandbox(sandbox.Limits(cpu_s=1, wall_s=2.0, memory_mb=256), workers=workers)
        res = b.map(jobs)
        b.close()
        outs.append([(r.returncode, r.stdout, r.timed_out) for r in res])
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][0][1] == b"1\n" and outs[0][2][1] == b"45\n" and outs[0][3][2]
    assert outs[0][1][1] == outs[0][4][1] == outs[0][7][1] == b"%d\n" % (sandbox.Limits().nproc - 2)


def test_no_writes_outside_the_sandbox(box, tmp_path):
    tmp_path.chmod(0o777)  # even a world-writable directory of the parent is out of reach
    marks = [tmp_path / f"mark-{secrets.token_hex(4)}", Path("/tmp") / f"flowrl-mark-{secrets.token_hex(4)}",
             Path("/var/tmp") / f"flowrl-mark-{secrets.token_hex(4)}", Path("/dev/shm") / f"flowrl-{secrets.token_hex(4)}",
             Path.cwd() / f"mark-{secrets.token_hex(4)}", Path.home() / f"mark-{secrets.token_hex(4)}"]
    src = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n" \
          "    except OSError as e:\n        print('refused', p, e.errno)\n" % [str(m) for m in marks]
    res = box.run({"m.py": src}, ["m.py"])
    assert res.returncode == 0, res.stderr
    assert not any(m.exists() for m in marks), res.stdout
    # the writes to /tmp, /var/tmp and /dev/shm "succeed" inside: private tmpfs, gone with the run
    assert b"refused " + str(marks[0]).encode() in res.stdout
    home = box.run({"m.py": "import os\nopen('f', 'w').write('x' * 100)\nprint(os.getcwd(), os.listdir('.'))"}, ["m.py"])
    assert home.stdout.startswith(b"/tmp/box ") and b"'f'" in home.stdout


def test_file_size_and_tmpfs_are_capped(box):
    res = box.run({"m.py": "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10 ** 6)\n"}, ["m.py"])
    assert res.returncode != 0 and not res.timed_out  # SIGXFSZ or ENOSPC, not a full disk


def test_environment_is_scrubbed(box, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("FLOWRL_TEST_SECRET", secret)
    src = ("import os\nprint(dict(os.environ))\nfor p in ('/proc/1/environ', '/proc/%d/environ'):\n"
           "    try: print(open(p).read())\n    except OSError as e: print('no', e.errno)\n" % os.getpid())
    res = box.run({"m.py": src}, ["m.py"])
    assert res.returncode == 0, res.stderr
    assert secret.encode() not in res.stdout + res.stderr
    assert b"FLOWRL_TEST_SECRET" not in res.stdout


def test_parent_cannot_be_killed(box):
    me = os.getpid()
    src = ("import os, signal\nfor pid in (%d, os.getppid(), 1, -1, 0):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
           "        print('sent', pid)\n    except OSError as e:\n        print('refused', pid, e.errno)\n" % me)
    res = box.run({"m.py": src}, ["m.py"])
    assert os.getpid() == me  # still here
    assert f"refused {me} ".encode() in res.stdout or res.returncode is not None


def test_network_is_unreachable(box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        src = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=2)\n    print('connected')\n"
               "except OSError as e:\n    print('refused', e.errno)\n" % port)
        res = box.run({"m.py": src}, ["m.py"])
        assert b"refused" in res.stdout and b"connected" not in res.stdout, res.stdout + res.stderr
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing reached the listener
    finally:
        srv.close()


def test_output_is_bounded_and_wall_limit_holds(box):
    t0 = time.monotonic()
    res = box.run({"m.py": "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n    sys.stderr.write('z' * 65536)\n"},
                  ["m.py"])
    # stopped by the wall limit (loaded machine) or by RLIMIT_CPU (SIGXCPU / SIGKILL, idle machine)
    assert res.truncated and (res.timed_out or res.returncode >= 128), (res.returncode, res.timed_out)
    assert len(res.stdout) == len(res.stderr) == LIMITS.output_bytes
    assert time.monotonic() - t0 < LIMITS.wall_s + 2.0


def test_daemonized_children_do_not_survive(box):
    # a grandchild that escapes the process group (setsid) and outlives its parent dies with the run
    src = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\nprint('bye')\n"
    res = box.run({"m.py": src}, ["m.py"])
    assert res.returncode == 0 and res.stdout == b"bye\n"
    assert not sandbox_uids_alive()


def test_external_executor_hook():
    seen = []

    def remote(job: sandbox.Job) -> sandbox.Result:
        seen.append(job.argv)
        return sandbox.Result(0, stdout=b"3\n")

    b = sandbox.Sandbox(LIMITS, workers=1, executor=remote)
    assert b.isolation == ["external"]
    assert b.run({"m.py": "print(3)"}, ["m.py"]).stdout == b"3\n" and seen == [["m.py"]]
    broken = sandbox.Sandbox(LIMITS, workers=1, executor=lambda job: 1 / 0)
    assert "ZeroDivisionError" in broken.run({"m.py": ""}, ["m.py"]).error


def test_bad_arguments():
    with pytest.raises(ValueError, match="Limits.wall_s"):
        sandbox.Limits(wall_s=0)
    with pytest.raises(ValueError, match="workers"):
        sandbox.Sandbox(workers=-1)
    with pytest.raises(ValueError, match="plain name"):
        sandbox.Sandbox(LIMITS, workers=1).run({"../x.py": ""}, ["x.py"])
