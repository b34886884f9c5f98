"""A real Ray head (`ray start --head`) for tests, with its own ports and temp dir, that stops only itself.

`ray stop` stops every Ray process of the machine and has no way to name one cluster, and
`ray.cluster_utils.AutoscalingCluster` calls `ray stop --force` on start and on shutdown (and, in the
Ray 2.60 wheel, cannot even be constructed: its base config `fake_multi_node/example.yaml` is not
shipped). Other Ray instances run on the test machines, so this head is started with `--block` in a new
session, and stopping it signals exactly the processes of that session by pid: `ray start`, its node's
processes, and the fake worker nodes the autoscaler started (they outlive the autoscaler otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

VENV_BIN = str(Path(sys.executable).parent)
RAY = os.path.join(VENV_BIN, "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_autoscaling_config(gcs_address: str, head_cpus: int, worker_node_types: dict) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider (nodes are local processes)."""
    return {
        "cluster_name": "slidestream-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "docker": {},
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_node_types,
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalHead:
    """`ray start --head --block` on free ports, token auth on (a fresh token, passed by environment)."""

    def __init__(self, num_cpus: int = 2, worker_node_types: dict | None = None) -> None:
        self.num_cpus = num_cpus
        self.worker_node_types = worker_node_types
        self.port = free_port()
        self.dashboard_port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="ssh-", dir="/tmp")  # short: unix socket paths are limited
        self.token = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self.log = Path(self.temp_dir) / "ray-start.log"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for a client of this head: the token by variable, the auth mode left to the client."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_TOKEN=self.token, PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_DEDUP_LOGS="0")
        return env

    def start(self, timeout: float = 90) -> LocalHead:
        env = self.client_env()
        env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", SLIDESTREAM_PROGRESS="0")
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats",
            f"--port={self.port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={200 * 2**20}",
            f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        if self.worker_node_types is not None:
            from ray._private.services import get_node_ip_address

            config = fake_autoscaling_config(
                f"{get_node_ip_address()}:{self.port}", self.num_cpus, self.worker_node_types
            )
            path = Path(self.temp_dir) / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}:\n{self.log.read_text()}")
            url = urllib.request.Request(
                f"{self.dashboard_url}/api/version", headers={"Authorization": f"Bearer {self.token}"}
            )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the Ray head did not come up in {timeout:.0f} s:\n{self.log.read_text()}")

    def session_processes(self) -> list[psutil.Process]:
        """Live processes of the head's session: `ray start` itself and everything it started."""
        if self.process is None:
            return []
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self.process.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def stop(self) -> None:
        """SIGTERM to every process of the head's session (by pid), SIGKILL to what is left after 5 s."""
        if self.process is not None:
            for _ in range(2):  # a second pass for processes started while the first one stopped
                procs = self.session_processes()
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        proc.terminate()
                _, alive = psutil.wait_procs(procs, timeout=5)
                for proc in alive:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                psutil.wait_procs(alive, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def monitor_log(self) -> str:
        """The autoscaler's log (what it launched and why)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.*"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
