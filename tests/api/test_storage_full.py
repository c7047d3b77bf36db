"""A full disk under the real server: refused writes are RESOURCE_EXHAUSTED, nothing acknowledged is lost.

The procedure and its checks live in openemploi.testing.disk_faults (disk_full_cycle, also a row of
`make chaos`): the server subprocess's RLIMIT_FSIZE is lowered with prlimit until its collection's
files cannot grow, upserts run until refused, the limit is lifted (space freed) and upserts resume,
then a shutdown snapshot fails against a low limit and the restarted server replays the store.
"""

from __future__ import annotations

import sys

from harness import REPO_ROOT

from openemploi.testing.disk_faults import disk_full_cycle
from openemploi.testing.faults import ChaosRun


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def test_a_full_disk_refuses_writes_with_resource_exhausted_and_loses_nothing(default_version, tmp_path):
    run = ChaosRun(tmp_path / "chaos", REPO_ROOT / "models", seed=7, log=log)
    try:
        run.setup()
        run.fill(10)  # 200 documents in the collection before the disk fills
        report = disk_full_cycle(run, refusals=3, resumed_requests=3)
        assert report.survived, report.describe()
        assert len(report.refusals) == 3, report.describe()
        for refusal in report.refusals:
            assert refusal.startswith("RESOURCE_EXHAUSTED: collection storage is full"), refusal
            assert "free disk space" in refusal, refusal
        # disk_full_cycle checked every acknowledged document after the restart (Get, content, Search k=1)
        assert report.acknowledged == len(run.acknowledged) >= 200 + 60
        assert not report.lost
    finally:
        run.close()
