"""A command killed with SIGKILL (or by the OOM killer) while its embedded local Ray trains:
every process of that Ray ends within seconds. (Without the CLI's watchdog, Ray's dashboard
and runtime-env agents outlive the driver by a minute: they wait 60 s to report the dead
raylet to the dead cluster.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from faultkit import REPO, write_vqa_world

from ray_updown.ray_cluster import _descendants, _processes


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(started: dict[int, str]) -> dict[int, str]:
    now = _processes()
    return {pid: _cmdline(pid) for pid, t in started.items() if now.get(pid, (0, ""))[1] == t}


def test_a_killed_command_leaves_no_ray_process_behind(tmp_path):
    data = write_vqa_world(str(tmp_path / "vqa"))
    overrides = [f"data.{k}={v}" for k, v in data.items()] + [
        "model.hidden=16", "model.embed_dim=8", "model.question_len=6", "batch_size=8",
        "patience=0", "epochs=100000"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    driver = subprocess.Popen([sys.executable, "-m", "ray_updown.cli", "train-vqa",
                               "--storage-path", str(tmp_path / "runs"), "--name", "killed",
                               *overrides], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            ray_processes = _descendants(driver.pid)
            if any("RayTrainWorker" in _cmdline(pid) for pid in ray_processes):
                break
            assert driver.poll() is None, "the command ended before its worker started"
            time.sleep(1)
        else:
            raise AssertionError("no training worker started")
        time.sleep(2)  # the watchdog notes the processes once a second
        ray_processes = _descendants(driver.pid)
        agents = {pid for pid in ray_processes if "Agent" in _cmdline(pid)}
        assert len(agents) == 2, [_cmdline(p) for p in ray_processes]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()

    killed = time.time()
    while time.time() - killed < 60 and _alive(ray_processes):
        time.sleep(0.5)
        if time.time() - killed > 10:
            assert not agents & set(_alive(ray_processes)), "Ray's agents outlived the driver"
    assert not _alive(ray_processes)
