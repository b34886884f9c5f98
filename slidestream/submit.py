"""`slidestream submit`: run a slidestream command on a Ray cluster as a Ray job.

The project directory travels as the job's working dir (so the cluster runs the submitter's code),
the storage variables (S3 endpoint, credentials, region) travel in the job's runtime env, the job's
logs are followed, and the command's exit code becomes ours. Nothing shown is left unscrubbed: secret
values (AWS secret key, session token, the Ray auth token) never reach the terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from slidestream.cluster.errors import UsageError
from slidestream.cluster.runtime import runtime_env_vars
from slidestream.cluster.storage import SECRET_ENV_VARS, scrub_secrets

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_FAILED = 1  # the job failed and Ray did not report the command's own exit code
EXIT_NOT_SUBMITTED = 2  # bad usage, cluster unreachable, refused
EXIT_INTERRUPTED = 130  # stopped following with Ctrl-C (the job keeps running)

# Never uploaded with the working dir (the .gitignore is honoured as well).
EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    ".whl",
    "slidestream-demo",
    "outputs",
]
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The source tree this `slidestream` runs from: it becomes the job's working dir."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "cluster").is_dir():
        raise UsageError(
            f"slidestream submit needs the project's source tree (with pyproject.toml); {root} is not one"
        )
    return root


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS, else the local dashboard; a bare host:port gets http://."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise UsageError(
            f"submit talks to the Ray dashboard (http://HEAD:8265), not the Ray client port: got {address}"
        )
    return address


def entrypoint(command: list[str], gpus: int = 0, cpus: int = 0, wait_s: float = 900) -> str:
    """The shell command the job runs. A leading `slidestream` runs the uploaded code (`python -m
    slidestream.cli`), whatever version the cluster has installed; with --gpus/--cpus the command waits until
    the autoscaler has added those resources (stages use GPUs only when the cluster has them)."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("nothing to run: slidestream submit [options] -- <command …>")
    if command[0] == "slidestream":
        command = ["python", "-m", "slidestream.cli", *command[1:]]
    if gpus or cpus:
        prelude = ["python", "-m", "slidestream.job_entry", f"--gpus={gpus}", f"--cpus={cpus}"]
        command = [*prelude, f"--wait-s={wait_s:g}", "--", *command]
    return shlex.join(command)


def runtime_env(root: Path | None, credentials: bool = True) -> dict:
    """The job's runtime env: the project as working dir (None: the nodes have it installed) and the
    storage variables (without the access keys when `credentials` is False)."""
    env_vars = runtime_env_vars()
    if not credentials:
        env_vars = {k: v for k, v in env_vars.items() if k not in (*SECRET_ENV_VARS, "AWS_ACCESS_KEY_ID")}
    env: dict = {"env_vars": env_vars}
    if root is not None:
        env.update(working_dir=str(root), excludes=list(EXCLUDES))
    return env


def _auth_token() -> str | None:
    """The Ray auth token where Ray looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token := os.environ.get(AUTH_TOKEN_ENV, "").strip():
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """A bearer token for clusters with token auth. Ray's client sends one only when RAY_AUTH_MODE=token
    is set here; when the mode is unset we send the token we find (a cluster without auth ignores it)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return {}
    token = _auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def scrub(text: str) -> str:
    text = scrub_secrets(text)
    token = _auth_token()
    if token and len(token) >= 4:
        text = text.replace(token, f"<{AUTH_TOKEN_ENV}>")
    return text


class LineScrubber:
    """Writes a stream of chunks line by line, scrubbed: a secret split across chunks is still caught."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.pending, self.seen = out, "", 0

    def write(self, chunk: str) -> None:
        self.seen += len(chunk)
        lines = (self.pending + chunk).split("\n")
        self.pending = lines.pop()
        for line in lines:
            self.out.write(scrub(line) + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.pending:
            self.out.write(scrub(self.pending) + "\n")
            self.pending = ""
        self.out.flush()


def _say(message: str) -> None:
    print(f"slidestream submit: {scrub(message)}", file=sys.stderr, flush=True)


def _local_path_warnings(command: list[str]) -> None:
    for flag in ("--slides", "--out", "--features", "--run"):
        if flag in command[:-1]:
            value = command[command.index(flag) + 1]
            if "://" not in value:
                _say(f"note: {flag} {value} is a path on the cluster's nodes, not on this machine")


async def _follow(client, job_id: str, sink: LineScrubber) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sink.write(chunk)


def _wait_terminal(client, job_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def exit_code(info) -> int:
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else EXIT_FAILED


def submit(
    *,
    job_command: list[str],
    address: str | None = None,
    gpus: int = 0,
    cpus: int = 0,
    wait_nodes_s: float = 900,
    job_id: str | None = None,
    no_wait: bool = False,
    no_working_dir: bool = False,
    no_credentials: bool = False,
    overrides: list[str] | None = None,
    config_file: str | None = None,
    verbose: bool = False,
) -> int:
    """`slidestream submit [options] -- COMMAND`. `overrides`/`config_file` (given before `--`) would
    apply to submit itself, not to the command: they are only there to say so."""
    from ray.job_submission import JobSubmissionClient

    if not verbose:  # Ray's chatter (files skipped, upload names, websocket closed)
        for name in ["ray", *logging.root.manager.loggerDict]:
            if name == "ray" or name.startswith("ray."):
                logging.getLogger(name).setLevel(logging.ERROR)

    address = resolve_address(address)
    command = job_command[1:] if job_command[:1] == ["--"] else list(job_command)
    entry = entrypoint(command, gpus=gpus, cpus=cpus, wait_s=wait_nodes_s)
    _local_path_warnings(command)
    if overrides or config_file:
        _say("note: --config/--set before `--` apply to submit itself; give them to the command after `--`")
    env = runtime_env(None if no_working_dir else project_root(), credentials=not no_credentials)
    try:
        client = JobSubmissionClient(address, headers=auth_headers())
        job_id = client.submit_job(entrypoint=entry, runtime_env=env, submission_id=job_id)
    except Exception as exc:  # unreachable, refused (auth), rejected runtime env: say why, in one line
        _say(f"cannot submit to {address}: {exc}")
        return EXIT_NOT_SUBMITTED
    forwarded = ", ".join(sorted(env["env_vars"])) or "none"
    _say(f"job {job_id} submitted to {address}: {entry}")
    where = env.get("working_dir", "none (the nodes' installed slidestream)")
    _say(f"  working dir: {where}; environment passed through: {forwarded} (values not shown)")
    follow = f"ray job logs --follow {job_id} --address {address}"
    if no_wait:
        _say(f"not waiting. Follow: {follow}   status: ray job status {job_id} --address {address}")
        return 0
    sink = LineScrubber(sys.stdout)
    try:
        try:
            asyncio.run(_follow(client, job_id, sink))
        except Exception as exc:  # the log stream broke: poll, then print what was missed
            _say(f"log stream interrupted ({exc}); waiting for the job to end")
            info = _wait_terminal(client, job_id, timeout=float("inf"))
            sink.write(client.get_job_logs(job_id)[sink.seen :])
        sink.close()
        info = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        sink.close()
        _say(f"stopped following; job {job_id} keeps running (ray job stop {job_id} --address {address})")
        return EXIT_INTERRUPTED
    code = exit_code(info)
    detail = f" (exit code {code})" if code else ""
    message = ""
    if code and info.message:  # Ray's message repeats the end of the log, already shown: its first part
        message = ": " + info.message.split(", last available logs")[0].splitlines()[0]
    _say(f"job {job_id} {info.status}{detail}{message}")
    return code
