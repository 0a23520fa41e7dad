"""A real Ray cluster on this machine, for the tests that need one: a head and worker nodes, each started with
`ray start --block` in a session of its own, on free ports, with a private temp dir and token authentication
on, never touching another Ray instance here.

A node is stopped by signalling the processes of its own session, never with `ray stop` (which stops every
Ray on the machine); killing them with SIGKILL is how a test loses a node.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid`: everything one `ray start` spawned, and nothing else."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def stop_session(proc: subprocess.Popen, kill: bool = False) -> None:
    """Stop one node we started: `ray start --block` stops its children on SIGTERM; stragglers of its session (and
    only those) get SIGKILL. With `kill`, every process of the session gets SIGKILL at once (a node lost)."""
    if kill:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 20
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_head(proc: subprocess.Popen, probe: str, auth: dict[str, str], log_path: Path) -> bool:
    """True once the dashboard answers an authenticated request; False if `ray start` exited."""
    deadline = time.monotonic() + 180
    while proc.poll() is None:
        try:
            if http_get(probe, auth)[0] == 200:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not come up in 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)
    return False


@dataclass
class Head:
    dashboard: str
    metrics_url: str
    env: dict[str, str]  # a client environment holding the token file path (RAY_AUTH_MODE unset)
    token_file: Path
    gcs: str = ""  # host:port, for `rayrlhf train --address` and worker nodes
    node_env: dict[str, str] = field(default_factory=dict)  # the environment nodes start with
    temp_dir: Path = Path()
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text()}"}

    def add_node(self, num_cpus: int, resources: str = "{}") -> subprocess.Popen:
        """A worker node joined to this head (its own session: `stop_session(node, kill=True)` loses it)."""
        node_mgr, obj_mgr, agent, agent_grpc, metrics = free_ports(5)
        cmd = [str(BIN / "ray"), "start", f"--address={self.gcs}", "--block", f"--num-cpus={num_cpus}",
               f"--resources={resources}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", "--runtime-env-agent-port=0", "--min-worker-port=0",
               "--max-worker-port=0"]
        log_path = self.temp_dir / f"node-{len(self.nodes)}.log"
        with log_path.open("w") as log_fh:
            node = subprocess.Popen(cmd, env=self.node_env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=self.temp_dir)  # started elsewhere: actors there do not share the job's directory
        self.nodes.append(node)
        return node


@contextmanager
def ray_cluster(token_dir: Path, head_cpus: int = 8, env_extra: dict[str, str] | None = None) -> Iterator[Head]:
    """A head node with token auth on free ports; `head.add_node(...)` joins worker nodes; all stopped on exit."""
    # A short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rrl-", dir="/tmp"))
    token_file = token_dir / "auth_token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The head is started as from a virtualenv that was not activated: `ray` by its full path, and
    # the venv's bin/ (with `rayrlhf`) not on PATH, so jobs must find rayrlhf without it. Only the
    # venv's `ninja` is put first on PATH: DeepSpeed JIT-builds its CPU op with the PATH's ninja,
    # and another one than this test session's other processes use would rebuild it.
    shim = temp_dir / "bin"
    shim.mkdir()
    (shim / "ninja").symlink_to(BIN / "ninja")
    path = [p for p in base.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    base["PATH"] = os.pathsep.join([str(shim), *path])
    env = {
        **base,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_metrics_report_interval_ms": "1000",  # export every second (default 10 s): the test job is short
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env_extra or {}),
    }
    auth = {"Authorization": f"Bearer {token_file.read_text()}"}  # the fixture's own readiness probe
    procs: list[subprocess.Popen] = []
    head = None
    try:
        # A free port can be taken by another process before Ray binds it; then `ray start` exits
        # and the head is started again on new ports.
        for attempt in range(3):
            # The runtime-env agent binds a port of its own choosing (0): a port picked here could be taken, before
            # `ray start` binds it, by another Ray's worker; the head would then come up talking to that Ray's agent,
            # which refuses this head's token (403) and fails every job's runtime env.
            gcs, dash, metrics, client, agent, agent_grpc, node_mgr, obj_mgr = free_ports(8)
            cmd = [
                str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--num-cpus={head_cpus}",
                f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                "--runtime-env-agent-port=0", f"--node-manager-port={node_mgr}",
                f"--object-manager-port={obj_mgr}", "--min-worker-port=0", "--max-worker-port=0",
            ]
            log_path = temp_dir / f"head-{attempt}.log"
            with log_path.open("w") as log_fh:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True))
            dashboard = f"http://127.0.0.1:{dash}"
            if _wait_for_head(procs[-1], f"{dashboard}/api/jobs/", auth, log_path):
                break
            stop_session(procs[-1])
        else:
            raise RuntimeError(f"ray start failed 3 times; the last log:\n{log_path.read_text()[-3000:]}")
        client_env = {**base, "RAY_AUTH_TOKEN_PATH": str(token_file)}
        head = Head(dashboard, f"http://127.0.0.1:{metrics}/metrics", client_env, token_file, f"127.0.0.1:{gcs}", env,
                    temp_dir)
        yield head
    finally:
        for proc in [*(head.nodes if head else []), *procs]:
            stop_session(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
