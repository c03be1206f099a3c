"""The trusted test harness, copied into each sandbox run as ``harness.py`` (stdlib only).

    python -I -S -B harness.py <verdict fd>      # stdin: the nonce; files: solution.py, tests.json

Order, and why:
1. Read the nonce (the parent's random token) from stdin, then point fd 0 at /dev/null; read
   ``tests.json`` and ``solution.py`` into memory and delete both files (the program cannot read its
   tests from disk). The nonce lives only in ``main``'s fast locals from here on.
2. Import the stdlib modules solutions commonly use, copy the builtins, bind every function the harness
   needs later to locals (a program that patches ``builtins``/``os``/``json`` changes nothing here).
3. Arm an audit hook (PEP 578; it cannot be removed) that ends the process with no verdict on anything
   that could read the nonce or fake the harness: frame access (``sys._getframe``, ``tb_frame``,
   ``gi_frame``...), ``sys._current_frames``, ``gc.get_objects/referrers/referents``, ``ctypes``,
   ``marshal.load(s)``, ``pickle.find_class``, ``code.__new__``, tracing/profiling hooks, opening
   anything under /proc (``/proc/self/mem``), new processes or threads, sockets, signals. The cost:
   the few legitimate programs that call these (e.g. ``collections.namedtuple`` uses ``sys._getframe``)
   score 0.
4. ``exec`` the solution in a fresh namespace; run each test in a namespace with the clean builtins,
   the entry point (``candidate`` too) wrapped so that any return value that is not built from exact
   builtin types (int, float, str, list, dict, ... -- no subclasses) fails the test: an object whose
   ``__eq__`` always says True cannot pass an ``assert f(x) == y``. Every ``BaseException`` (SystemExit,
   KeyboardInterrupt, AssertionError, ...) is a failed test.
5. Write ``<nonce> <passed> <total>`` to the verdict fd and ``os._exit(0)`` at once (no atexit handlers,
   no finalizers of the program run after the verdict).

A program that exits early (``os._exit(0)``, ``sys.exit`` at top level, a crash, a kill, closing fds)
never produces the nonce: the parent scores it 0.
"""
import builtins
import json
import os
import sys

# imported before the audit hook is armed: some (typing) call sys._getframe at import time
import bisect, collections, copy, decimal, fractions, functools, hashlib, heapq, itertools, math, operator, random, re, statistics, string, typing  # noqa: E401,F401

_BLOCKED = ("sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
            "gc.get_referrers", "gc.get_referents", "object.__getattr__", "marshal.load", "marshal.loads",
            "pickle.find_class", "code.__new__", "function.__new__", "os.fork", "os.forkpty", "os.system",
            "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "subprocess.Popen",
            "_thread.start_new_thread", "socket.", "signal.", "os.putenv", "sys.addaudithook")
_PLAIN = (int, float, complex, bool, str, bytes, type(None), list, tuple, dict, set, frozenset)


def main():
    # every callable used after the program has run is bound here, before it runs
    write, exit_, type_, isinstance_, all_, exec_, compile_, callable_, len_, list_, dict_, bytes_ = (
        os.write, os._exit, type, isinstance, all, exec, compile, callable, len, list, dict, bytes)
    blocked, plain_types = _BLOCKED, _PLAIN
    fd = int(sys.argv[-1])
    nonce = os.read(0, 64).strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open("tests.json", encoding="utf-8") as f:
        spec = json.load(f)
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    os.remove("tests.json")
    os.remove("solution.py")
    entry, setup, tests = spec["entry_point"], spec.get("setup", ""), list_(spec["tests"])
    clean = dict_(builtins.__dict__)
    realpath, str_ = os.path.realpath, str

    def plain(v, depth=0):
        t = type_(v)
        if t not in plain_types or depth > 50:
            return False
        if t is list or t is tuple or t is set or t is frozenset:
            return all_(plain(x, depth + 1) for x in v)
        if t is dict:
            return all_(plain(k, depth + 1) and plain(x, depth + 1) for k, x in v.items())
        return True

    def hook(event, args):
        if event.startswith(blocked) or event.startswith("ctypes"):
            exit_(3)
        # /proc/self/mem would show the nonce; the sandbox mounts an empty /proc, this is the second lock
        if event == "open" and args and isinstance_(args[0], (str_, bytes_)):
            p = args[0].decode(errors="replace") if isinstance_(args[0], bytes_) else args[0]
            if "proc" in p or realpath(p).startswith("/proc"):
                exit_(3)

    sys.addaudithook(hook)
    sys.setrecursionlimit(3000)
    program = {"__name__": "solution", "__builtins__": builtins}
    passed, total = 0, len_(tests)
    try:
        exec_(compile_(source, "solution.py", "exec"), program)
        fn = program[entry]
        if not callable_(fn):
            raise TypeError("entry point is not callable")
    except BaseException:
        fn = None
    if fn is not None:
        def candidate(*a, **k):
            out = fn(*a, **k)
            if not plain(out):
                raise TypeError("return value is not made of plain builtin types")
            return out

        env = {"__builtins__": dict_(clean), "__name__": "tests", "candidate": candidate, entry: candidate}
        try:
            exec_(compile_(setup, "setup", "exec"), env)
            ok_setup = True
        except BaseException:
            ok_setup = False
        for t in tests:
            if not ok_setup:
                break
            env[entry] = env["candidate"] = candidate  # a test cannot rebind them for the next one
            try:
                exec_(compile_(t, "test", "exec"), env)
                passed += 1
            except BaseException:
                pass
    try:
        write(fd, b"%s %d %d\n" % (nonce, passed, total))
    finally:
        exit_(0)


main()
