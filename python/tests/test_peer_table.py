"""scripts/peer_table.py, the table of scripts/bench-peers.sh: medians, and ratios paired within
each repetition, checked against values worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "peer_table.py"


def ours(rep, store, batch, out, cells_per_s):
    return {"rep": rep, "store_name": store, "batch_size": batch, "out": out, "cells_per_s": cells_per_s}


def annbatch(store, chunk, preload, batch, out, cells_per_s):
    return {"loader": "annbatch", "params": f"x,{store}", "chunk_size": chunk, "preload_nchunks": preload,
            "batch_size": batch, "output": out, "cells_per_s": cells_per_s}


def test_ratios_are_paired_within_each_repetition(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    # The machine halves its speed in repetition 2, for every loader alike.
    speed = {1: 1.0, 2: 0.5, 3: 1.0}
    lines = []
    for rep, f in speed.items():
        lines.append(ours(rep, "raw", 128, "csr", 1000 * f))
        lines.append(ours(rep, "zstd", 128, "csr", [800, 700, 900][rep - 1] * f))
        peers = [annbatch("lz4", 512, 32, 128, "csr", 250 * f), annbatch("lz4", 32, 256, 128, "csr", 100 * f),
                 annbatch("raw", 512, 32, 128, "csr", 400 * f), {"loader": "annbatch", "error": "oom"}]
        (res / f"peers-{rep}.json").write_text(json.dumps({"results": peers}))
    (res / "ours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "tag"], check=True, capture_output=True,
                          text=True).stdout
    # Medians of the runs: zstd 800, 350, 900 -> 800; annbatch lz4 chunk 512 250, 125, 250 -> 250.
    assert "| cpa-stream | zstd | 128 | csr | 800 | 3.20x |" in text
    # Paired: zstd / raw 0.8, 0.7, 0.9 -> 0.8 (0.70-0.90); raw / annbatch 4 in each repetition;
    # zstd / annbatch 3.2, 2.8, 3.6. Unpaired, the slow repetition would have set the medians.
    assert "| 128 | csr | 0.80 (0.70-0.90) | 4.00x (4.00-4.00) | 3.20x (2.80-3.60) |" in text
    assert (res / "table.md").read_text().strip() == text.strip()
