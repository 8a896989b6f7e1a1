"""`loopgpt serve --ray` as a user runs it, and the Ray Serve config file under deploy/ray/.

- the CLI starts a local Ray cluster with one replica, answers through Ray's proxy (named by the replica's
  header, the API key enforced), and on SIGTERM drains, stops Ray and exits 0 with no Ray process left behind;
- without Ray installed, `--ray` is one sentence naming the extra; bad scaling flags are one sentence;
- deploy/ray/loopgpt.yaml passes Ray Serve's own config schema and builds the application it names.

    python -m pytest tests/test_ray_cli.py -q
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from server_harness import free_port, wait_healthy

if os.environ.get("CI") == "true":
    import ray  # noqa: F401  (the dev extra installs it: in CI a missing Ray is a failure, not a skip)
else:
    pytest.importorskip("ray", reason='Ray Serve is not installed (pip install -e ".[ray]")')
from loopgpt.server.ray_serve import DEPLOYMENT, LoopGPTReplica, ReplicaSettings, build_app, deployment_options  # noqa: E402
from loopgpt.server.scaling import Scaling  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from loopgpt.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "checkpoints" / "demo"
CONFIG = ROOT / "deploy" / "ray" / "loopgpt.yaml"


def children(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (Ray's node processes are children of the process that started it)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # exited while we looked
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_ray_answers_through_the_proxy_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "loopgpt.cli", "serve", "--ray", "--replicas", "1", "--threads", "1",
           "--checkpoint", str(DEMO), "--device", "cpu", "--port", str(port), "--shutdown-grace", "2",
           "--metrics-sd-dir", str(tmp_path / "sd"), "--api-key", "sekret", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"),
                            start_new_session=True)  # a signal for it alone, as a process manager sends
    url, ray_processes = f"http://127.0.0.1:{port}", set()
    try:
        wait_healthy(url, 120, proc, 0.5, exited=lambda: (tmp_path / "log").read_text()[-2000:],
                     each=lambda: ray_processes.update(children(proc.pid)))
        body = {"prompt": "Once upon a time", "max_tokens": 4}
        denied = httpx.post(f"{url}/generate?loops=2", json=body, timeout=60)  # our errors, through Ray's proxy
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/generate?loops=2", json=body, headers={"Authorization": "Bearer sekret"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        replica = r.headers["x-loopgpt-replica"]
        assert [f.stem for f in (tmp_path / "sd").glob("*.json")] == [replica]
        ray_processes |= children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, (tmp_path / "log").read_text()[-2000:]
        time.sleep(1)
        assert not [p for p in ray_processes if alive(p)], "Ray processes outlived loopgpt serve --ray"
        assert not list((tmp_path / "sd").glob("*.json"))  # the replica withdrew its metrics target
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in ray_processes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_serve_ray_without_ray_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None; from loopgpt.cli import main; "
            "sys.exit(main(['serve', '--ray', '--replicas', '2', '--checkpoint', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, str(DEMO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "loopgpt serve: error: --ray needs Ray Serve, which is not installed: pip install -e \".[ray]\" "
        "(ray is missing)"]


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:3"], "give --replicas N or --autoscale MIN:MAX, not both"),
    (["--ray", "--autoscale", "3"], "--autoscale takes MIN:MAX replica counts such as 1:4, got '3'"),
    (["--ray", "--autoscale", "4:2"], "--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got '4:2'"),
    (["--ray", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--ray", "--target-ongoing", "4"], "--target-ongoing needs --autoscale MIN:MAX"),
])
def test_bad_scaling_flags_are_one_sentence(flags, message, capsys):
    assert main(["serve", "--checkpoint", str(DEMO), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_busy_port_or_an_unreachable_cluster_is_one_sentence(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--ray", "--checkpoint", str(DEMO), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    closed = free_port()  # nothing listens there
    assert main(["serve", "--ray", "--checkpoint", str(DEMO), "--ray-address", f"127.0.0.1:{closed}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{closed}" in err[0]


def test_the_ray_serve_config_file_is_valid_and_builds():
    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)  # Ray's own validation of `serve run`/`serve deploy` input
    [app] = schema.applications
    assert app.import_path == "loopgpt.server.ray_serve:build_app"
    [deployment] = app.deployments
    assert deployment.name == DEPLOYMENT  # the section applies to our deployment, not a new one
    server = app.args["server"]
    assert deployment.autoscaling_config["target_ongoing_requests"] == server["max_batch"]
    assert deployment.max_ongoing_requests == server["max_batch"] + server["max_queue"]
    assert deployment.ray_actor_options.num_cpus == app.args["threads"]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # `serve run` resolves the relative checkpoint against where it runs
        built = build_app(app.args)
    finally:
        os.chdir(cwd)
    assert Path(built._bound_deployment.init_args[0]["checkpoint"]) == DEMO


def test_config_args_that_are_not_settings_are_one_sentence():
    with pytest.raises(ValueError, match="got chekpoint"):
        build_app({"chekpoint": "checkpoints/demo"})
    with pytest.raises(ValueError, match="args.server takes ServerOptions fields"):
        build_app({"checkpoint": str(DEMO), "server": {"max_batchh": 8}})


@pytest.mark.parametrize("scaling, expect", [
    (Scaling(replicas=3), {"num_replicas": 3}),
    (Scaling(autoscale=(0, 4), target_ongoing=2),
     {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                             "target_ongoing_requests": 2}}),
    (Scaling(autoscale=(2, 6)),  # the target defaults to a full batch per replica
     {"autoscaling_config": {"min_replicas": 2, "max_replicas": 6, "initial_replicas": 2,
                             "target_ongoing_requests": 8}}),
])
def test_scaling_flags_become_deployment_options_ray_accepts(scaling, expect):
    settings = ReplicaSettings(checkpoint=str(DEMO), threads=2, server={"max_batch": 8, "max_queue": 64})
    options = deployment_options(settings, scaling, grace_s=12.5, gpus=1.0)
    assert {k: options[k] for k in expect} == expect
    assert options["max_ongoing_requests"] == 8 + 64 and options["graceful_shutdown_timeout_s"] == 12.5
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1.0}
    config = LoopGPTReplica.options(**options)._deployment_config  # Ray's own validation of every option
    assert config.graceful_shutdown_timeout_s == 12.5
    if scaling.autoscale:
        assert config.autoscaling_config.max_replicas == scaling.autoscale[1]
