"""`slidestream submit`: the command line, the runtime env, scrubbing, exit codes; then real jobs on a
real local head (`ray start --head`), and an autoscaling head (Ray's fake multi-node provider) where the
embedding stage's GPU request makes the autoscaler add a GPU node."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.localhead import LocalHead, free_port

from slidestream import job_entry, submit
from slidestream.cli import build_parser, main
from slidestream.cluster.runtime import JOB_CONFIG_ENV, driver_runtime_env
from slidestream.cluster.storage import STORAGE_ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
FAKE_SECRET = "fake-secret-Zq8yXv2Lr5"  # a test value that must never be printed


def test_parser_leaves_the_command_after_dashdash_alone():
    args = build_parser().parse_args(
        ["submit", "--address", "http://head:8265", "--no-wait", "--gpus", "2", "--",
         "slidestream", "run", "--out", "s3://b/o", "--set", "embed.actors=2", "--config", "c.yaml"]
    )  # fmt: skip
    assert args.command == "submit" and args.address == "http://head:8265" and args.no_wait
    assert args.gpus == 2 and args.overrides == [] and args.config_file is None
    command = args.job_command[1:] if args.job_command[0] == "--" else args.job_command
    inner = ["run", "--out", "s3://b/o", "--set", "embed.actors=2", "--config", "c.yaml"]
    assert command == ["slidestream", *inner]


def test_entrypoint():
    assert submit.entrypoint(["--", "slidestream", "synth", "--out", "/tmp/a b"]) == (
        "python -m slidestream.cli synth --out '/tmp/a b'"
    )  # a leading `slidestream` runs the uploaded code
    assert submit.entrypoint(["python", "-c", "print(1)"]) == "python -c 'print(1)'"
    wrapped = submit.entrypoint(["slidestream", "status", "--out", "s3://b/o"], gpus=2, wait_s=60)
    assert wrapped == (
        "python -m slidestream.job_entry --gpus=2 --cpus=0 --wait-s=60 -- "
        "python -m slidestream.cli status --out s3://b/o"
    )
    with pytest.raises(ValueError, match="nothing to run"):
        submit.entrypoint(["--"])


def test_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert submit.resolve_address(None) == "http://from-env:8265"
    assert submit.resolve_address("head:8265") == "http://head:8265"
    with pytest.raises(ValueError, match="dashboard"):
        submit.resolve_address("ray://head:10001")


def test_runtime_env_carries_project_and_storage_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    env = submit.runtime_env(submit.project_root())
    assert env["working_dir"] == str(ROOT)
    assert {".venv", ".git", "slidestream-demo"} <= set(env["excludes"])
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    keyless = submit.runtime_env(None, credentials=False)
    assert "working_dir" not in keyless
    assert keyless["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(keyless["env_vars"])


def test_driver_inside_a_job_does_not_repeat_the_jobs_variables(monkeypatch):
    """Ray refuses a driver runtime env that sets a variable the job's runtime env sets too."""
    for name in STORAGE_ENV_VARS:  # an S3 server fixture earlier in the session may have set some
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert driver_runtime_env()["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "x", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    assert driver_runtime_env() == {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"}}
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert driver_runtime_env() is None


def test_auth_token_header(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123456")
    assert submit.auth_headers() == {"Authorization": "Bearer tok-123456"}
    assert submit.scrub("token tok-123456 here") == "token <RAY_AUTH_TOKEN> here"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's client sends the header itself then
    assert submit.auth_headers() == {}


def test_log_lines_are_scrubbed_even_when_a_secret_is_split(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    out = StringIO()
    sink = submit.LineScrubber(out)
    for chunk in ["key=", FAKE_SECRET[:7], FAKE_SECRET[7:] + "\nnext", " line"]:
        sink.write(chunk)
    sink.close()
    assert out.getvalue() == "key=<AWS_SECRET_ACCESS_KEY>\nnext line\n"
    assert sink.seen == len("key=" + FAKE_SECRET + "\nnext line")


def test_exit_codes():
    assert submit.exit_code(SimpleNamespace(status="SUCCEEDED", driver_exit_code=0)) == 0
    assert submit.exit_code(SimpleNamespace(status="FAILED", driver_exit_code=3)) == 3
    assert submit.exit_code(SimpleNamespace(status="FAILED", driver_exit_code=None)) == submit.EXIT_FAILED
    assert submit.exit_code(SimpleNamespace(status="STOPPED", driver_exit_code=None)) == submit.EXIT_FAILED
    with pytest.raises(SystemExit):
        job_entry.main(["--gpus", "1"])  # no command


def test_unreachable_cluster_is_a_clear_error(capsys):
    code = main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "python", "-c", "1"])
    assert code == submit.EXIT_NOT_SUBMITTED
    assert "cannot submit to http://127.0.0.1:" in capsys.readouterr().err


def _submit(head: LocalHead, *args: str, env: dict | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "slidestream.cli", "submit", "--address", head.dashboard_url, *args],
        env=env or head.client_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# A GPU worker type that starts at 0 nodes (a fake GPU resource: this machine has none).
GPU_TYPE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}


@pytest.fixture(scope="module")
def head():
    """A real head on its own ports, token auth on (the client finds the token in RAY_AUTH_TOKEN), with an
    autoscaler that may add one GPU node; only the autoscaler test asks for a GPU."""
    with LocalHead(num_cpus=2, worker_node_types={"gpu": GPU_TYPE}) as started:
        yield started


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_runs_a_command_on_a_real_head(head, tmp_path):
    out = tmp_path / "synth"
    run = _submit(head, "--", "slidestream", "synth", "--out", str(out), "--n-slides", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrote 1 easy tiny svs slides" in run.stdout  # the job's log, followed
    assert "SUCCEEDED" in run.stderr
    assert (out / "slide_000.svs").is_file()  # the head is this machine
    assert head.token not in run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_job_sets_the_exit_code_and_secrets_stay_hidden(head):
    env = {**head.client_env(), "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_ACCESS_KEY_ID": "AKEYID"}
    script = "import os, sys; print('job sees', os.environ['AWS_SECRET_ACCESS_KEY']); sys.exit(3)"
    run = _submit(head, "--", "python", "-c", script, env=env)
    shown = run.stdout + run.stderr
    assert run.returncode == 3, shown
    assert "job sees <AWS_SECRET_ACCESS_KEY>" in run.stdout  # it reached the job, and was scrubbed
    assert "FAILED (exit code 3)" in run.stderr
    assert FAKE_SECRET not in shown and head.token not in shown
    assert "AWS_SECRET_ACCESS_KEY" in run.stderr  # named among the variables passed through

    quick = _submit(head, "--no-wait", "--", "python", "-c", "print(1)")
    assert quick.returncode == 0 and "not waiting" in quick.stderr and "raysubmit_" in quick.stderr


def _state(head: LocalHead, what: str) -> list[dict]:
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/{what}?detail=1&limit=1000",
        headers={"Authorization": f"Bearer {head.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)["data"]["result"]["result"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_autoscaler_adds_a_gpu_node_for_the_embedding_stage(head, tmp_path):
    """GPU worker type from 0 (fake GPU resource): `submit --gpus 1` asks the autoscaler for a GPU, the node
    joins, `slidestream run` puts its encoder actors (num_gpus=1) there, the job finishes.

    `--no-working-dir`: the fake nodes share this machine's disk and session dir, and Ray unpacks a job's
    working dir again (deleting it first) on a node that has not seen it, under the running driver: an
    artifact of one-machine fake clusters (real nodes have their own disks). The working dir is covered by
    the tests above; here the nodes use the installed project, as on a cluster built from an image.
    """
    from slidestream.pipelines.synthetic import write_dataset

    assert not any(n["resources_total"].get("GPU") for n in _state(head, "nodes")), "GPU nodes start at 0"
    write_dataset(str(tmp_path / "slides"), 1, seed=3, size="tiny")
    run = _submit(
        head, "--gpus", "1", "--wait-nodes-s", "180", "--no-working-dir", "--",
        "slidestream", "run", "--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "out"),
        "--encoder", "resnet18_trunc", "--weights", "random", "--tile-px", "64",
        "--set", "embed.input_px=32", "--set", "ingest.read_cpus=0.5", "--set", "ingest.plan_cpus=0.25",
        timeout=360,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "1 ingested, 0 failed" in run.stdout
    assert list((tmp_path / "out" / "features").glob("*/slide_000.parquet"))

    gpu_nodes = {n["node_id"] for n in _state(head, "nodes") if n["resources_total"].get("GPU")}
    assert len(gpu_nodes) == 1, "the autoscaler added one GPU node"
    assert "Adding 1 node(s) of type gpu" in head.monitor_log()
    encoders = [a for a in _state(head, "actors") if "EmbedActor" in a["class_name"]]
    assert encoders, "the embedding stage ran"
    for actor in encoders:
        assert actor["required_resources"].get("GPU") == 1, actor["required_resources"]
        assert actor["node_id"] in gpu_nodes
