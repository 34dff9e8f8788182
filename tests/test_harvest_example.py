"""The harvesting example end to end: a text file in, sharded safetensors out, equal to captures taken one
session at a time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import djinn

ROOT = Path(__file__).resolve().parent.parent
SITE = "blocks.1.hook_resid_post"
TEXT = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog.\n" * 12


def test_harvest_writes_shards_equal_to_single_captures(tmp_path):
    data, out = tmp_path / "corpus.txt", tmp_path / "acts"
    data.write_text(TEXT, encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "examples" / "harvest_activations.py"), "--data", str(data),
                    "--out", str(out), "--site", SITE, "--context", "32", "--shard-tokens", "100", "--window", "4"],
                   check=True, timeout=300, capture_output=True)
    index = json.loads((out / "index.json").read_text())
    client = djinn.connect()
    body = [t for line in TEXT.splitlines(keepends=True) for t in client.tokenize(line, prepend_bos=False)]
    bos = client.tokenize("")
    want = [bos + body[k:k + 31] for k in range(0, len(body) - 30, 31)]  # whole prompts of 32 tokens only
    assert index["site"] == SITE and len(index["shards"]) > 1
    shards = [load_file(str(out / s["file"])) for s in index["shards"]]
    acts, tokens = torch.cat([s["activations"] for s in shards]), torch.cat([s["tokens"] for s in shards])
    assert index["rows"] == len(acts) == 32 * len(want) and tokens.tolist() == [t for p in want for t in p]
    first = want[0]
    with client.session() as s:
        ref = s.generate(first, max_new_tokens=0, interventions=[djinn.Capture(SITE)]).captures[(SITE, 0)]
    assert (acts[:32] - ref).abs().max() <= 1e-4
    client.close()
