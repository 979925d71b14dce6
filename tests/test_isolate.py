"""The isolated worker children (runtime/isolate.py) live exactly as long as the server process: not
less (a child started from a thread that has since ended still answers), not more (a child whose
parent died exits)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from flashvl_edge.runtime.isolate import WorkerPool

# a render that takes a few tenths of a second in the child: 3 million empty loop turns
SLOW = "{% for i in range(100000) %}{% for j in range(30) %}{% endfor %}{% endfor %}ok"
RENDER = "flashvl_edge.runtime.prompt:_render_in_worker"


def test_a_child_outlives_the_thread_that_started_it():
    pool = WorkerPool("test", size=1, memory_bytes=128 << 20, preload=("flashvl_edge.runtime.prompt", "jinja2.sandbox"))
    try:
        go = threading.Event()

        def starter():  # like a server's pool thread: starts the child, then goes idle and exits
            assert pool.call(RENDER, "x", [], False, {}, 1000, timeout_s=60) == ["x", []]
            go.wait(30)
            time.sleep(0.2)
        t = threading.Thread(target=starter)
        t.start()
        deadline = time.monotonic() + 30
        while not pool._children and time.monotonic() < deadline:
            time.sleep(0.01)
        go.set()  # the starter ends while this call runs in its child
        assert pool.call(RENDER, SLOW, [], False, {}, 1000, timeout_s=60) == ["ok", []]
        t.join(30)
        assert not t.is_alive()
    finally:
        pool.close()


def test_a_child_exits_when_its_parent_process_dies():
    code = ("import os, sys\n"
            "from flashvl_edge.runtime.isolate import WorkerPool\n"
            "pool = WorkerPool('t', size=1, memory_bytes=128 << 20)\n"
            "pool.call('flashvl_edge.runtime.isolate:_vm_size', timeout_s=60)\n"
            "print(next(iter(pool._children)).proc.pid, flush=True)\n"
            "os._exit(0)\n")  # no cleanup: the parent just disappears
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the child outlived its parent")
