#!/usr/bin/env python
"""Train Djinn's embedded default model: a tiny Llama-architecture causal LM on text that ships with every Python
installation (the standard library's help topics and docstrings), fully offline and with fixed seeds.

    python scripts/train_default_model.py                  # reproduces djinn/default_model/ (CPU, ~20 min)
    python scripts/train_default_model.py --device cuda --steps 500 --out /tmp/m

The output folder is a Hugging Face Llama checkpoint: config.json, model.safetensors (HF Llama weight names),
tokenizer.json (byte-level BPE) and tokenizer_config.json, so it loads in Djinn and in transformers alike.

Reproducibility: the corpus is read from the running interpreter's standard library (its text differs a little
between Python versions), and float kernels differ between machines and torch builds, so bit-identical weights
need the same Python, torch build and device as the committed run (see djinn/default_model/README.md).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: far faster when other processes share the CPU cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "djinn" / "default_model"
BOS, EOS = "<s>", "</s>"

# Standard-library folders left out of the corpus: tests, the IDLE/Tk GUI code, bundled wheels, installed packages.
SKIP_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
              "site-packages", "dist-packages", "__pycache__", "config-3", "venv"}


# ---------------------------------------------------------------- corpus

def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of the standard library's .py files (parsed, not imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_PARTS or p.startswith("config-") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(inspect.cleandoc(doc))
    return docs


def help_topics() -> list[str]:
    """The long English help texts behind `help("topic")` (the language reference, as plain text)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def build_corpus() -> list[str]:
    docs = help_topics() + stdlib_docstrings()
    seen, out = set(), []
    for d in docs:  # keep the first copy of duplicated docstrings
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    # Encoding with special tokens (what transformers' tokenizers do by default) prepends <s>, as Llama's does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


# ---------------------------------------------------------------- model (Llama: RMSNorm, rotate-half RoPE, SwiGLU)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(d_head: int, max_len: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int):
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = n_heads, n_kv, d // n_heads
        self.q_proj = nn.Linear(d, n_heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(d, n_kv * self.d_head, bias=False)
        self.v_proj = nn.Linear(d, n_kv * self.d_head, bias=False)
        self.o_proj = nn.Linear(n_heads * self.d_head, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.d_head).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.d_head).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d: int, d_mlp: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_mlp, bias=False)
        self.up_proj = nn.Linear(d, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(d, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, cfg["intermediate_size"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Parameter names follow Hugging Face's LlamaForCausalLM (`model.` prefix added when saving)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        d = cfg["hidden_size"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(d, cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(d, cfg["vocab_size"], bias=False)
        if cfg["tie_word_embeddings"]:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(d // cfg["num_attention_heads"], cfg["max_position_embeddings"], cfg["rope_theta"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg["num_hidden_layers"])
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)

    def forward(self, ids):
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------- training

def batches(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch: int, device: str) -> float:
    model.eval()
    n = (len(data) - 1) // seq_len
    losses = []
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch))[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        chunk = data[idx].to(device)
        logits = model(chunk[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item())
    model.train()
    return sum(losses) / (n * seq_len)


@torch.no_grad()
def sample(model, tok, prompt: str, n: int, device: str, temperature: float = 0.8, seed: int = 0) -> str:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = [tok.token_to_id(BOS)] + tok.encode(prompt, add_special_tokens=False).ids
    max_len = model.cfg["max_position_embeddings"]
    for _ in range(n):
        logits = model(torch.tensor([ids[-max_len:]], device=device))[0, -1].float().cpu()
        nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        if nxt == tok.token_to_id(EOS):
            break
        ids.append(nxt)
    model.train()
    return tok.decode(ids[1:], skip_special_tokens=False)


def save(model: Llama, tok, cfg: dict, out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, p in model.state_dict().items():
        key = name if name == "lm_head.weight" else "model." + name
        state[key] = p.detach().to("cpu", dtype).contiguous().clone()  # clone: tied weights must not share storage
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.chmod(out / f, 0o644)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=6)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--context", type=int, default=256, help="max_position_embeddings written to config.json")
    ap.add_argument("--seq-len", type=int, default=256, help="training window (at most --context)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--save-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()
    assert args.d_model % args.heads == 0 and args.heads % args.kv_heads == 0, "heads must divide d_model, kv_heads heads"
    assert args.seq_len <= args.context

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device
    t0 = time.time()

    docs = build_corpus()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters (Python {sys.version.split()[0]})",
          flush=True)
    tok = train_tokenizer(docs, args.vocab_size)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert (bos, eos) == (0, 1), (bos, eos)
    ids_per_doc = [[bos] + e.ids + [eos] for e in tok.encode_batch(docs, add_special_tokens=False)]
    # Hold out every 25th document (shuffled with the fixed seed) for a validation loss.
    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    val_docs = set(order[:: 25])
    train = torch.tensor([t for i in order if i not in val_docs for t in ids_per_doc[i]], dtype=torch.long)
    val = torch.tensor([t for i in sorted(val_docs) for t in ids_per_doc[i]], dtype=torch.long)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train):,} tokens, val {len(val):,} tokens "
          f"({sum(map(len, docs)) / sum(map(len, ids_per_doc)):.2f} chars/token) in {time.time() - t0:.1f}s",
          flush=True)

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.get_vocab_size(), "hidden_size": args.d_model, "intermediate_size": args.d_mlp,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.d_model // args.heads, "max_position_embeddings": args.context, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": args.save_dtype,
    }
    model = Llama(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({json.dumps({k: cfg[k] for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size')})})",
          flush=True)

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    train_start = time.time()
    smoothed = None
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr * 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches(train, args.seq_len, args.batch_size, gen)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - train_start
            print(f"step {step:5d}  loss {loss.item():.4f}  smooth {smoothed:.4f}  lr {lr:.2e}  {el:7.1f}s  "
                  f"({el / (step + 1):.3f}s/step)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  val loss {evaluate(model, val, args.seq_len, 64, device):.4f}", flush=True)
            print("  sample:", repr(sample(model, tok, "The module", 40, device)), flush=True)
    train_time = time.time() - train_start
    val_loss = evaluate(model, val, args.seq_len, 64, device)
    print(f"done: {args.steps} steps in {train_time:.1f}s, final train loss {loss.item():.4f} "
          f"(smoothed {smoothed:.4f}), val loss {val_loss:.4f}", flush=True)
    for prompt in ("The module", "The \"for\" statement", "This function"):
        print("sample:", repr(sample(model, tok, prompt, 60, device)), flush=True)
    save(model, tok, cfg, args.out, getattr(torch, args.save_dtype))
    print(f"saved to {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB), "
          f"total {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
