"""A site decodes each NIfTI file at most once in its lifetime, across rounds and ClientApp processes.

A Flower 1.42 SuperNode starts a fresh ClientApp process for every message, so each round
here runs in its own process, sharing only the site's on-disk case cache, as in deployment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import REPO

ROUND = """
import json, sys
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from fedlesion.client import app
from fedlesion.common.data import DECODE_STATS
from fedlesion.common.model import build_model
data, server_round = sys.argv[1], int(sys.argv[2])
run_config = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
              "val-fraction": 0.34, "samples-per-case": 2, "local-steps": 4, "batch-size": 2, "local-epochs": 1}
context = Context(run_id=1, node_id=7, node_config={"data-path": data}, state=RecordDict(), run_config=run_config)
arrays = ArrayRecord(build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict())
for kind in ("train", "evaluate"):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    reply = getattr(app, kind)(Message(content=content, dst_node_id=7, message_type=kind), context)
    assert not reply.has_error(), reply.error
print(json.dumps(DECODE_STATS.by_path))
"""


def test_a_site_decodes_each_file_at_most_once_across_rounds(tiny_sites: Path, tmp_path: Path) -> None:
    data = tiny_sites / "site-2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDLESION_CACHE_DIR": str(tmp_path / "cache")}
    decoded: Counter[str] = Counter()
    for server_round in (1, 2, 3):
        result = subprocess.run([sys.executable, "-c", ROUND, str(data), str(server_round)], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        decoded.update(json.loads(result.stdout.strip().splitlines()[-1]))
    files = sorted(str(p) for p in data.rglob("*.nii.gz"))
    assert sorted(decoded) == files, "every file was decoded in round 1"
    assert max(decoded.values()) == 1, {k: v for k, v in decoded.items() if v > 1}
