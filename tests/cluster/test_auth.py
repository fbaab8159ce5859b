"""Token authentication on a real multi-node cluster: the conftest gives every cluster of this
process RAY_AUTH_MODE=token and a token of its own (as cluster/aws.yaml and the KubeRay
manifests give every node type one shared token). A node with another token cannot join, a
driver without the token gets one line saying what to set, and Ray's job API refuses a
submission without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

from conftest import free_port, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _without_token(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_UPDOWN_TEST_AUTH"))}
    env["HOME"] = os.environ.get("TMPDIR", "/tmp")  # no ~/.ray/auth_token of the user's
    return {**env, **extra}


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def test_a_node_with_another_token_cannot_join(make_cluster):
    cluster = make_cluster(1)
    assert _alive_nodes() == 1
    intruder = subprocess.Popen(
        [RAY, "start", f"--address={cluster.address}", "--num-cpus=1",
         "--node-ip-address=127.0.0.1", "--block"],
        env=_without_token(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            output, _ = intruder.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            output = None
        assert _alive_nodes() == 1  # it never registered
        if output is not None:  # it gave up by itself
            assert intruder.returncode != 0, output
    finally:
        if intruder.poll() is None:
            os.killpg(intruder.pid, signal.SIGKILL)
            intruder.wait()
    # The same node with the cluster's token joins.
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    wait_for(lambda: _alive_nodes() == 2, 60, "the node with the right token to join")


JOIN = """
import sys
from ray_updown.cli_output import run_command
from ray_updown.ray_cluster import ensure_ray
sys.exit(run_command("extract", ensure_ray))
"""


def test_a_driver_without_the_token_gets_one_line_saying_what_to_set(make_cluster):
    """The driver tries the GCS 3 times (RAY_NUM_REDIS_GET_RETRIES, about a second apart)
    instead of Ray's 20 before it gives up: every attempt is refused alike, and the line it
    prints is the same."""
    cluster = make_cluster(1)
    done = subprocess.run([sys.executable, "-c", JOIN], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=_without_token(RAY_ADDRESS=cluster.address,
                                                          RAY_NUM_REDIS_GET_RETRIES="3"))
    assert done.returncode == 2, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("ray-updown extract:")]
    assert len(ours) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in ours[0] and "RAY_AUTH_TOKEN_PATH" in ours[0]
    assert os.environ["RAY_AUTH_TOKEN"] not in done.stderr + done.stdout


def test_a_job_submitted_without_the_token_is_refused(make_cluster):
    port = free_port()
    make_cluster(1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    address = f"http://127.0.0.1:{port}"

    def submit(env):
        return subprocess.run([RAY, "job", "submit", "--address", address, "--", "echo", "ran"],
                              capture_output=True, text=True, timeout=120, env=env)

    wait_for(lambda: submit(dict(os.environ)).returncode == 0, 90, "the job API with the token")
    refused = submit(_without_token())
    assert refused.returncode != 0
    assert "Authentication" in refused.stdout + refused.stderr
    assert "ran" not in refused.stdout


def test_ray_updown_submit_says_in_one_line_what_to_set_and_runs_with_the_token(make_cluster):
    port = free_port()
    make_cluster(1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    address = f"http://127.0.0.1:{port}"
    wait_for(lambda: subprocess.run([RAY, "job", "list", "--address", address],
                                    capture_output=True, timeout=60).returncode == 0,
             90, "the job API with the token")

    def submit(env, *command):
        return subprocess.run([sys.executable, "-m", "ray_updown.cli", "submit", "--address",
                               address, "--", *command], cwd=REPO, capture_output=True,
                              text=True, timeout=180, env=env)

    refused = submit(_without_token(), "echo", "ran")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()], refused.stderr
    assert refused.stderr.startswith("ray-updown submit: error: " + address)
    assert "RAY_AUTH_MODE=token" in refused.stderr and "ran" not in refused.stdout
    ran = submit(dict(os.environ), "echo", "ran")
    assert ran.returncode == 0 and "ran" in ran.stdout, ran.stderr[-3000:]
    assert '"status": "SUCCEEDED"' in ran.stdout
    failed = submit(dict(os.environ), "python", "-c", "raise SystemExit(3)")
    assert failed.returncode == 2 and "the job ended FAILED" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    for done in (refused, ran, failed):
        assert os.environ["RAY_AUTH_TOKEN"] not in done.stdout + done.stderr
