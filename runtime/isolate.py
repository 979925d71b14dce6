"""Bounded work in a child process: what a hostile input can make slow or huge, run where it can be cut.

    pool = WorkerPool("schema compiler", size=2, memory_bytes=512 * MiB)
    grammar = pool.call("flashvl_edge.runtime.structured:_compile_in_worker", schema_text, timeout_s=5)

Some work on request data cannot be bounded from inside the process: llguidance's regex analysis
of an ``allOf`` of patterns grows exponentially in native code (its own fuel limits do not reach
it), and a bundle's chat template is arbitrary Jinja (``{{ 'A' * 500000000 }}``, nested loops).
A thread cannot be stopped, and native code holding memory cannot be made to give it back. So such
work runs in a long-lived child (``python -m flashvl_edge.runtime.isolate``):

- the child caps its own address space (``RLIMIT_AS`` = its size after start-up + ``memory_bytes``),
  so a runaway allocation fails there (MemoryError, or native code aborting the child);
- a child that grew by more than a quarter of its budget is replaced after its call, so memory a
  hostile request made it take is not kept;
- the parent waits at most ``timeout_s`` for the answer, then kills the child (SIGKILL) and starts
  a fresh one on the next call (start-up, with the ``preload`` modules imported, is not counted); the
  child also exits when the server process is gone (a thread of its own watches for it), so a stuck
  render never outlives the server;
- requests and answers are JSON lines (never pickle): the child runs only functions named by
  ``module:function`` under ``flashvl_edge.runtime``, with JSON arguments, and returns JSON.

Errors come back as :class:`WorkerError` (``kind`` is "timeout", "memory", "crashed" or the
function's own exception class name, ``message`` its text); callers turn them into their own
one-line FlashVLError. A pool of ``size`` children serves concurrent callers; a caller waits for a
free child at most ``timeout_s`` too. Nothing here imports anything beyond the standard library.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time

MiB = 1024 * 1024
_ALLOWED_PREFIX = "flashvl_edge.runtime."
# what a child may import before its memory cap (besides runtime modules): the native libraries
_PRELOADABLE = ("llguidance", "llguidance.numpy", "jinja2", "jinja2.sandbox", "tokenizers", "numpy")


def _preloadable(name: str) -> bool:
    return name.startswith(_ALLOWED_PREFIX) or name in _PRELOADABLE


class WorkerError(Exception):
    """The isolated call failed: ``kind`` says how ("timeout", "memory", "crashed", "busy" or the
    exception class the function raised), ``message`` is one line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Child:
    def __init__(self, memory_bytes: int, preload: tuple = (), start_timeout_s: float = 60.0) -> None:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "flashvl_edge.runtime.isolate", str(int(memory_bytes)),
                                      *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self.buf = b""
        # start-up (interpreter, imports) is not part of any call's time budget: wait for "ready"
        try:
            ready = self._read_line(time.monotonic() + start_timeout_s)
        except WorkerError:
            self.kill()
            raise
        if ready != b"ready":
            self.kill()
            raise WorkerError("crashed", "the worker process did not start")
        self.base_rss = self.rss()

    def rss(self) -> int:
        """Resident bytes of the child (0 where /proc cannot tell)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def request(self, line: bytes, deadline: float) -> dict:
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError("crashed", "the worker process is gone") from None
        return json.loads(self._read_line(deadline))

    def _read_line(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError("timeout", "took too long")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait(timeout=5)
                # a native allocation failure aborts (SIGABRT); Python's ends in MemoryError below
                kind = "memory" if code in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGKILL) else "crashed"
                raise WorkerError(kind, f"the worker process ended (exit code {code})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


class WorkerPool:
    """Up to ``size`` isolated children, started on first use and replaced after a timeout or a crash."""

    def __init__(self, name: str, size: int = 2, memory_bytes: int = 512 * MiB, preload: tuple = ()) -> None:
        self.name = name
        self.memory_bytes = int(memory_bytes)
        self.preload = tuple(m for m in preload if _preloadable(m))
        self._idle: queue.LifoQueue = queue.LifoQueue()
        for _ in range(max(1, int(size))):
            self._idle.put(None)  # a slot; the child is started when the slot is first used
        self._closed = False
        self._children: set[_Child] = set()
        self._lock = threading.Lock()

    def call(self, target: str, *args, timeout_s: float):
        """``target(*args)`` (``"flashvl_edge.runtime.module:function"``) in a child; its JSON result,
        or WorkerError."""
        deadline = time.monotonic() + float(timeout_s)
        try:
            child = self._idle.get(timeout=max(0.0, float(timeout_s)))
        except queue.Empty:
            raise WorkerError("busy", f"every {self.name} worker stayed busy for {timeout_s:g} s") from None
        try:
            if child is None or not child.alive():
                child = self._start()
            line = (json.dumps({"target": target, "args": list(args)}) + "\n").encode()
            try:
                answer = child.request(line, deadline)
            except WorkerError:
                self._drop(child)
                child = None
                raise
            except (OSError, ValueError) as e:
                self._drop(child)
                child = None
                raise WorkerError("crashed", f"the worker's answer could not be read ({e})") from None
            if child is not None and child.rss() > child.base_rss + self.memory_bytes // 4:
                # a big call leaves its pages with the allocator: start afresh rather than keep them
                self._drop(child)
                child = None
        finally:
            self._idle.put(child)
        if "error" in answer:
            kind, message = answer["error"]
            raise WorkerError(str(kind), str(message))
        return answer["ok"]

    def _start(self) -> _Child:
        if self._closed:
            raise WorkerError("crashed", f"the {self.name} workers are shut down")
        child = _Child(self.memory_bytes, self.preload)
        with self._lock:
            self._children.add(child)
        return child

    def _drop(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            self._children.discard(child)

    def close(self) -> None:
        """Kill every child (a server shutting down); later calls fail."""
        self._closed = True
        with self._lock:
            children, self._children = list(self._children), set()
        for c in children:
            c.kill()


# --------------------------------------------------------------------------------------------
# The child


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _die_with_parent() -> None:
    """End this child when the parent process ends. Not with PR_SET_PDEATHSIG: Linux sends it when the
    parent *thread* that started the child exits (an idle worker thread of the server's pool), which
    killed calls in flight from other threads. A daemon thread watches for re-parenting instead (and
    the request loop ends on stdin's EOF)."""
    parent = os.getppid()
    if parent == 1:  # the parent is already gone
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(memory_bytes: int, preload: list[str]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is the parent's to handle
    out = sys.stdout.buffer
    limited = False
    for name in preload:
        if _preloadable(name):
            importlib.import_module(name)
    if preload and memory_bytes > 0:
        import resource

        cap = _vm_size() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        limited = True
    out.write(b"ready\n")
    out.flush()
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
            target = req["target"]
            module_name, _, func_name = target.partition(":")
            if not module_name.startswith(_ALLOWED_PREFIX) or not func_name:
                raise PermissionError(f"{target!r} is not a runtime function")
            func = getattr(importlib.import_module(module_name), func_name)
            if not limited and memory_bytes > 0:
                # after the first import (the function's module and its native libraries are mapped)
                import resource

                cap = _vm_size() + memory_bytes
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                limited = True
            answer = {"ok": func(*req["args"])}
        except MemoryError:
            answer = {"error": ["memory", "ran out of its memory budget"]}
        except Exception as e:  # noqa: BLE001 - every failure goes back as one line
            answer = {"error": [type(e).__name__, " ".join(str(e).split())[:500]]}
        try:
            data = json.dumps(answer)
        except (TypeError, ValueError, MemoryError) as e:
            data = json.dumps({"error": ["crashed", f"the answer is not JSON ({type(e).__name__})"]})
        out.write(data.encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0, sys.argv[2:])
