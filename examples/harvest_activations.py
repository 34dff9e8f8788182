"""Harvest one hook site's activations over a token dataset into sharded safetensors files (as SAE training
reads them).

    python examples/harvest_activations.py --data corpus.txt --site blocks.2.hook_resid_post --out acts/
    python examples/harvest_activations.py --url http://gpu-host:8000 --model my-model --data corpus.txt ...

The text is tokenized by the server's tokenizer and cut into prompts of `--context` tokens (each opening with
BOS where the model adds one); `client.run_iter` streams them through the engine, a window of them at a
time, and each shard holds `--shard-tokens` rows: `activations` [n, ...] in the model's dtype and `tokens`
[n] (the token each row belongs to). `index.json` lists the shards, the site and the model.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Iterator

import torch
from safetensors.torch import save_file

import djinn


def prompts_of(client: djinn.Client, path: str, context: int, model: str | None) -> Iterator[list[int]]:
    """The file's tokens in prompts of `context` tokens, a BOS (where the model has one) opening each."""
    bos = client.tokenize("", model)  # what an empty text opens with: the BOS, or nothing
    body = context - len(bos)
    pending: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            pending += client.tokenize(line, model, prepend_bos=False)
            while len(pending) >= body:
                yield bos + pending[:body]
                pending = pending[body:]


def harvest(client: djinn.Client, data: str, site: str, out: str, *, model: str | None = None, context: int = 128,
            shard_tokens: int = 1 << 16, window: int = 256, progress: bool = False) -> dict:
    os.makedirs(out, exist_ok=True)
    shards, rows, tokens, held = [], [], [], 0

    def flush() -> None:
        nonlocal rows, tokens, held
        if not rows:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({"activations": torch.cat(rows).contiguous(), "tokens": torch.tensor(tokens)},
                  os.path.join(out, name))
        shards.append({"file": name, "rows": held})
        rows, tokens, held = [], [], 0

    prompts = prompts_of(client, data, context, model)
    batch: collections.deque = collections.deque()

    def tagged() -> Iterator[list[int]]:  # keeps each prompt's ids for its result
        for p in prompts:
            batch.append(p)
            yield p
    results = client.run_iter(tagged(), model=model, window=window, progress=progress,
                              interventions=[djinn.Capture(site)])
    for out_ in results:
        ids = batch.popleft()
        value = out_.captures[(site, 0)]
        rows.append(value)
        tokens += ids
        held += len(ids)
        if held >= shard_tokens:
            flush()
    flush()
    info = next(m for m in client.models() if model in (None, m.name))
    index = {"model": info.name, "site": site, "context": context, "dtype": info.dtype, "shards": shards,
             "rows": sum(s["rows"] for s in shards)}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a UTF-8 text file")
    ap.add_argument("--site", default="blocks.1.hook_resid_post")
    ap.add_argument("--out", required=True, help="the folder the shards go into")
    ap.add_argument("--url", default=None, help="a Djinn server (default: the embedded engine)")
    ap.add_argument("--model", default=None, help="a model the server has (default: its first); embedded: a path")
    ap.add_argument("--context", type=int, default=128, help="tokens per prompt (default 128)")
    ap.add_argument("--shard-tokens", type=int, default=1 << 16, help="rows per shard (default 65536)")
    ap.add_argument("--window", type=int, default=256, help="prompts in flight (default 256)")
    args = ap.parse_args()
    client = djinn.connect(args.url) if args.url else djinn.connect(model=args.model)
    with client:
        index = harvest(client, args.data, args.site, args.out, model=args.model if args.url else None,
                        context=args.context, shard_tokens=args.shard_tokens, window=args.window, progress=True)
    print(f"{index['rows']} rows of {index['site']} in {len(index['shards'])} shards under {args.out}")


if __name__ == "__main__":
    main()
