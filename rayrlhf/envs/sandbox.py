"""The `python` code-execution tool: model-written code in a fresh, limited interpreter.

Each run gets a new `python -I` process in an empty temporary directory, with an empty environment
(no inherited tokens or keys), stdin closed, resource limits (address space, CPU time, file size,
open files, processes), a wall-clock timeout that kills its whole process group, output cut to a
bound and, where the kernel allows unprivileged namespaces, no network and no view of other
processes (`unshare -rnpf --mount-proc`: new user, network, PID and mount namespaces).
What this does not protect against is written in docs/agents.md ("Tools"): it
is a guard against accidents and runaway code, not a security boundary.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Runs first in the sandboxed process: set the limits, die with the parent, then exec the rest of argv
# (`unshare ... python main.py`, which keeps the limits and the parent-death signal).
_LAUNCHER = """\
import ctypes, json, os, resource, sys
for name, value in json.loads(sys.argv[1]).items():
    which = getattr(resource, name)
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))
try:
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: no orphan outlives its caller
except Exception:
    pass
if os.getppid() != int(sys.argv[2]):
    os._exit(1)
os.execv(sys.argv[3], sys.argv[3:])
"""

SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
FILE_LIMIT_BYTES = 16 << 20


# Tried in order. With a PID namespace the code runs as its PID 1: other processes (and their
# /proc/<pid>/environ) are out of sight, and everything it started dies with it (--kill-child).
_UNSHARE_FLAGS = (["-rnpf", "--mount-proc", "--kill-child"], ["-rn"], ["-n"])


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that runs a process without network (`unshare`), or [] where that is not permitted."""
    unshare = shutil.which("unshare")
    if unshare is None:
        log.info("python tool: `unshare` not found; sandboxed code keeps the host's network")
        return []
    why = ""
    for flags in _UNSHARE_FLAGS:
        try:
            done = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            why = str(exc)
            continue
        if done.returncode == 0:
            return [unshare, *flags]
        why = done.stderr.decode(errors="replace").strip()
    log.info("python tool: `unshare -rn` is not permitted here (%s); sandboxed code keeps the host's network", why)
    return []


def _limits(timeout_s: float, memory_mb: int) -> dict[str, int]:
    return {
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_CPU": int(timeout_s) + 1,
        "RLIMIT_FSIZE": FILE_LIMIT_BYTES,
        "RLIMIT_NOFILE": 256,
        "RLIMIT_NPROC": 64,  # counts all processes of the user, and is not enforced for root
        "RLIMIT_CORE": 0,
    }


def _describe_end(code: int | None, timed_out: bool, timeout_s: float) -> str:
    if timed_out:
        return f"[killed: timed out after {timeout_s:g}s]"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed",
               "SIGSEGV": "segfault"}.get(name, "")
        return f"[killed by {name}{': ' + why if why else ''}]"
    return f"[exit status {code}]" if code else ""


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 8192,
               network: bool = False, site_packages: bool = True) -> str:
    """Run `code` in a fresh sandboxed interpreter; return its stdout and stderr (interleaved), cut to
    `max_output_chars`, followed by how it ended when that was not a clean exit."""
    with tempfile.TemporaryDirectory(prefix="rayrlhf-python-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(code)
        flags = ["-I", "-u"] if site_packages else ["-I", "-u", "-S"]  # unbuffered: stdout and stderr in order
        command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(_limits(timeout_s, memory_mb)),
                   str(os.getpid()), *([] if network else network_isolation()), sys.executable, *flags, "main.py"]
        timed_out = False
        with open(work / ".output", "w+b") as out:
            proc = subprocess.Popen(command, cwd=work, env={**SANDBOX_ENV, "HOME": tmp, "TMPDIR": tmp},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the whole group: the code may have started processes of its own
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            size = out.seek(0, os.SEEK_END)
            out.seek(0)
            text = out.read(max_output_chars * 4).decode("utf-8", errors="replace")
        text = text.replace(f"{work}/", "")  # tracebacks name "main.py", not a random directory
    if len(text) > max_output_chars or size > max_output_chars * 4:
        text = text[:max_output_chars] + f"\n[output truncated: {size} bytes in all]"
    end = _describe_end(proc.returncode, timed_out, timeout_s)
    return f"{text.rstrip()}\n{end}".strip() if end else text


def make_python_tool(timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 8192,
                     network: bool = False, site_packages: bool = True) -> Callable[[str], str]:
    """A `python(code)` tool with these limits (put it in your env.tools list)."""

    def python(code: str) -> str:
        """Run Python code in a fresh interpreter and return what it prints (stdout and stderr).

        Args:
            code: A complete Python program. Use print() to show results; nothing is kept between calls.
        """
        return run_python(code, timeout_s, memory_mb, max_output_chars, network, site_packages)

    return python
