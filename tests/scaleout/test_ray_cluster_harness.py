"""The local Ray cluster harness's own logic that needs no cluster: reading `ray status`, sparing live owners."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from openemploi.testing.ray_cluster import CLUSTER_MARK, count_alive_nodes, reap_orphans

STATUS = """======== Autoscaler status: 2026-12-05 10:12:40.505544 ========
Node status
---------------------------------------------------------------
Active:
 1 node_8a30234b136e3081131b17d2630d228f207e53adf8d7371b4b1749db
 1 node_ade6050f46cf92d8db315640d86eed76b92278d2b8389daa7992f6dc
Idle:
 1 node_0b6f1e2c
Pending:
 (no pending nodes)
Recent failures:
 node_5d1c0a: NodeTerminated (ip: 192.0.2.2)

Resources
---------------------------------------------------------------
Total Usage:
 0.0/3.0 CPU
 0.0/1.0 worker1
"""


def test_alive_nodes_are_the_active_and_idle_ones_not_the_failed():
    assert count_alive_nodes(STATUS) == 3
    assert count_alive_nodes(STATUS.replace(" 1 node_0b6f1e2c\n", " (no idle nodes)\n")) == 2
    assert count_alive_nodes("") == 0


def test_a_node_whose_owner_lives_is_left_alone_and_an_orphan_is_killed():
    """Stand-ins for a node's `ray start`: a sleep marked with a live owner (this process) and one marked
    with an owner that has exited."""
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_owner = int(exited.stdout)
    if psutil.pid_exists(dead_owner):  # pid reused already: nothing to learn from this run
        return
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    owned = subprocess.Popen(sleep, env={**os.environ, CLUSTER_MARK: f"{os.getpid()}:/tmp/not-a-cluster"})
    orphan = subprocess.Popen(sleep, env={**os.environ, CLUSTER_MARK: f"{dead_owner}:/tmp/not-a-cluster"})
    try:
        reaped = reap_orphans()
        assert orphan.pid in reaped and owned.pid not in reaped
        orphan.wait(timeout=10)  # reaped already by reap_orphans (it waits for what it kills)
        assert not psutil.pid_exists(orphan.pid)
        assert owned.poll() is None
    finally:
        for process in (owned, orphan):
            process.kill()
            process.wait(timeout=10)
