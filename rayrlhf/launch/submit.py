"""`rayrlhf submit`: run a job on a Ray cluster through the Ray Jobs API.

    rayrlhf submit CONFIG.yaml --address http://HEAD:8265 [--set k=v ...] [--follow]

1. The config is resolved and validated here, before anything is sent (exit 2 when invalid).
2. The runtime environment carries a working directory: by default the current directory
   (the project), minus virtualenvs, outputs and checkpoints, so the job runs the code and
   data paths that `rayrlhf train` would use here. With `--no-working-dir` only the resolved
   config travels and the cluster's installed `rayrlhf` runs.
3. The resolved config is staged as a file inside that working directory
   (`.rayrlhf-submit/<submission id>.yaml`), and the entrypoint runs
   `rayrlhf train .rayrlhf-submit/<submission id>.yaml` — the same command as on a laptop, which
   is also what `ray job submit -- rayrlhf train CONFIG` runs. A head started from a virtualenv
   that was not activated has no `rayrlhf` on its PATH; the entrypoint then runs the command
   with the Python interpreter that runs Ray itself, and failing that says what to do (exit 127).
4. The job id and its dashboard URL are printed; `--follow` streams the logs and exits with
   the job's outcome (0 when it SUCCEEDED, 1 otherwise).

Token authentication (on by default since Ray 2.59 for local clusters) stays on: the client
sends `Authorization: Bearer <token>`, with the token found the way Ray documents it —
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. (Ray's own
client only sends it when RAY_AUTH_MODE=token is set in the submitting shell.) The token is
never put into the job's runtime environment or printed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrlhf.config import JobConfig, load_config, to_yaml
from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)

STAGE_DIR = ".rayrlhf-submit"
# Never uploaded: environments, run outputs, caches. Patterns are gitignore-style, as Ray reads them.
DEFAULT_EXCLUDES = (
    ".venv/", "venv/", ".git/", "outputs/", "checkpoints/", "wandb/", "tensorboard/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", "*.egg-info/", "build/", "dist/",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The cluster could not be reached, refused the request, or the job could not be followed."""


# --------------------------------------------------------------------------------------- auth
def find_auth_token() -> str | None:
    """The Ray auth token, looked up in Ray's documented order; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not token:
            raise InvalidInput(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def auth_headers() -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs API: the bearer token when there is one."""
    token = find_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: str | None) -> str:
    """The dashboard URL to submit to: --dashboard, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise InvalidInput(
            "--dashboard: the cluster's dashboard address is required, for example --dashboard http://HEAD:8265 "
            "(or set RAY_API_SERVER_ADDRESS)"
        )
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise InvalidInput(f"--dashboard {address}: expected the dashboard's http(s)://HOST:PORT (the Jobs API), not a Ray client address")
    return address.rstrip("/")


def make_client(address: str) -> Any:
    """A JobSubmissionClient that authenticates; connection and auth failures become SubmitError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as exc:
        raise SubmitError(f"the cluster at {address} refused the auth token: {exc}") from None
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {exc}") from None


# ------------------------------------------------------------------------------------ the job
@dataclass
class Submission:
    """What is sent: entrypoint, runtime environment and the staged config."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    config_yaml: str
    working_dir: Path | None
    excludes: list[str] = field(default_factory=list)


def new_submission_id(cfg: JobConfig) -> str:
    return f"rayrlhf-{cfg.algorithm.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): too short for a job
# to finish its step and write a checkpoint. Submitted jobs get this much, unless --stop-grace-s says otherwise.
DEFAULT_STOP_GRACE_S = 600


def prepare(
    cfg: JobConfig,
    working_dir: str | Path | None,
    excludes: list[str] | tuple[str, ...] = (),
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    resume: bool = False,
    stop_grace_s: int = DEFAULT_STOP_GRACE_S,
) -> Submission:
    """Build the submission for `cfg`; `working_dir=None` relies on the cluster's installed rayrlhf. `resume`
    continues the run in cfg.output_dir from its latest checkpoint; `stop_grace_s` is how long `ray job stop`
    waits for the job to checkpoint and exit before it kills it (the job supervisor reads it from the job's env)."""
    submission_id = submission_id or new_submission_id(cfg)
    config_rel = f"{STAGE_DIR}/{submission_id}.yaml"
    wd = None
    if working_dir is not None:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise InvalidInput(f"--working-dir {working_dir}: not a directory")
    all_excludes = [*DEFAULT_EXCLUDES, *excludes]
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s)), **(env_vars or {})}}
    return Submission(
        submission_id=submission_id,
        entrypoint=entrypoint(["train", config_rel, *(["--resume"] if resume else [])]),
        runtime_env=runtime_env,
        config_yaml=to_yaml(cfg),
        working_dir=wd,
        excludes=all_excludes if wd is not None else [],
    )


# The job supervisor runs an entrypoint with /bin/sh -c, as its child: $PPID is the supervisor, a
# Python process of the environment Ray runs in, whose memory map names that environment's
# site-packages (through ray/_raylet.so): <env>/lib/pythonX.Y/site-packages -> <env>/bin/python.
_FIND_PYTHON = (
    r"sed -n 's|^.* \(/.*\)/lib/python[0-9.]*/site-packages/ray/_raylet\.so$|\1/bin/python|p' "
    "/proc/$PPID/maps 2>/dev/null | head -n 1"
)
NOT_FOUND = (
    "rayrlhf submit: the cluster cannot run rayrlhf: it is not on the PATH of the Ray head ($PATH), and "
    "the Python that runs Ray cannot import it. Install rayrlhf into the environment Ray runs from on "
    "every node, or start Ray with that environment activated (source .venv/bin/activate && ray start ...)."
)


def entrypoint(args: list[str]) -> str:
    """A shell entrypoint running `rayrlhf ARGS` on the cluster, robust to a head whose PATH lacks `rayrlhf`.

    Order: `rayrlhf` on PATH; the interpreter that runs Ray (`$py -m rayrlhf.launch.cli`); python3 or
    python if it can import rayrlhf, ray and torch; otherwise a message saying what to do, exit 127.
    """
    cli = " ".join(shlex.quote(a) for a in args)
    return (
        f"if command -v rayrlhf >/dev/null 2>&1; then exec rayrlhf {cli}; fi; "
        f'for py in "$({_FIND_PYTHON})" python3 python; do '
        f'if [ -n "$py" ] && "$py" -c "import rayrlhf.launch.cli, ray, torch" >/dev/null 2>&1; then '
        f'exec "$py" -m rayrlhf.launch.cli {cli}; fi; done; '
        f'echo "{NOT_FOUND}" >&2; exit 127'
    )


def submit(client: Any, sub: Submission, metadata: dict[str, str] | None = None) -> str:
    """Stage the config, upload and submit; returns the submission id.

    With a working directory the config is written into it for the length of the upload and
    removed again; without one, a temporary directory holding only the config is uploaded.
    """
    from ray.exceptions import AuthenticationError

    tmp = None
    if sub.working_dir is not None:
        root = sub.working_dir
        stage = root / STAGE_DIR
        created = not stage.exists()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="rayrlhf-submit-"))
        root, stage, created = tmp, tmp / STAGE_DIR, True
    staged = stage / f"{sub.submission_id}.yaml"
    runtime_env = {**sub.runtime_env, "working_dir": str(root)}
    if sub.excludes:
        runtime_env["excludes"] = sub.excludes
    try:
        stage.mkdir(exist_ok=True)
        staged.write_text(sub.config_yaml)
        return client.submit_job(
            entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env=runtime_env,
            metadata={"rayrlhf": "1", **(metadata or {})},
        )
    except AuthenticationError as exc:
        raise SubmitError(f"the cluster refused the auth token: {exc}") from None
    except (ConnectionError, RuntimeError) as exc:
        raise SubmitError(f"submitting the job failed: {exc}") from None
    finally:
        staged.unlink(missing_ok=True)
        if created:
            shutil.rmtree(stage, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def job_url(address: str, submission_id: str) -> str:
    return f"{address}/#/jobs/{submission_id}"


# ------------------------------------------------------------------------------------- follow
async def _tail(client: Any, submission_id: str, out: Any) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()


def _poll_logs(client: Any, submission_id: str, out: Any, interval_s: float = 2.0) -> None:
    """Fallback when the log websocket is unavailable (e.g. behind a proxy): poll the whole log."""
    seen = 0
    while True:
        status = str(client.get_job_status(submission_id))
        logs = client.get_job_logs(submission_id)
        if len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status.rsplit(".", 1)[-1] in TERMINAL:
            return
        time.sleep(interval_s)


def wait_status(client: Any, submission_id: str, timeout_s: float = 60.0) -> str:
    """The job's terminal status (SUCCEEDED, FAILED, STOPPED), waiting up to `timeout_s` for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def follow(client: Any, submission_id: str, out: Any = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    out = out or sys.stdout
    try:
        asyncio.run(_tail(client, submission_id, out))
    except Exception as exc:  # noqa: BLE001 - any websocket trouble: fall back to polling
        log.warning("log streaming failed (%r); polling the job's logs instead", exc)
        _poll_logs(client, submission_id, out)
    return wait_status(client, submission_id)


# --------------------------------------------------------------------------------------- CLI
def run_submit(
    config: str,
    overrides: list[str],
    address: str | None,
    working_dir: str | None,
    no_working_dir: bool,
    excludes: list[str],
    follow_logs: bool,
    submission_id: str | None = None,
    resume: bool = False,
    stop_grace_s: int = DEFAULT_STOP_GRACE_S,
) -> int:
    """The `rayrlhf submit` command; returns the process exit code."""
    cfg = load_config(config, overrides)  # ConfigError (exit 2) before anything is sent
    address = dashboard_address(address)
    wd = None if no_working_dir else (working_dir or os.getcwd())
    if not Path(cfg.output_dir).is_absolute():
        log.warning(
            "output_dir=%s is relative: on the cluster it resolves inside the job's working directory, which Ray "
            "deletes eventually; use an absolute path on storage every node shares (e.g. --set output_dir=/mnt/shared/run)",
            cfg.output_dir,
        )
    sub = prepare(cfg, wd, excludes, submission_id=submission_id, resume=resume, stop_grace_s=stop_grace_s)
    client = make_client(address)
    job_id = submit(client, sub)
    print(f"submitted job {job_id}")
    print(f"  entrypoint: rayrlhf train {STAGE_DIR}/{sub.submission_id}.yaml{' --resume' if resume else ''}")
    print(f"  dashboard:  {job_url(address, job_id)}")
    if not follow_logs:
        print(f"  logs:       ray job logs --follow {job_id} --address {address}  (Ray's own CLI; with RAY_AUTH_MODE=token)")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        sys.stderr.write(f"rayrlhf: stopped following; job {job_id} keeps running (ray job stop {job_id} ends it)\n")
        raise
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        if info.message:
            sys.stderr.write(f"rayrlhf: job {job_id} {status}: {info.message}\n")
        return 1
    return 0
