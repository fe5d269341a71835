"""Predict the next character of English text (Python's own docstrings) with Adam and the
square-root scaling rule: a small adaptrun language model.

Shows an Adam-trained model under adaptrun: ``SqrtScale`` raises the LR by sqrt(B/B0) when
the batch grows (warmed up), the noise scale is measured on Adam's preconditioned gradient,
and ``autoscale_batch_size`` lets the controller grow the batch (with accumulation). The text
needs no download: the docstrings (``ast.get_docstring``) of the standard library's top-level
modules in sorted order, up to ``--corpus-kb`` KB, the same on every machine with the same
Python version. Blocks of 2 KB alternate into the split: every 10th is held out.

The model reads the ``--context`` characters before each position (an embedding, then an MLP
over that window, written as convolutions so one example predicts ``--seq-len`` positions at
once). Rank 0 prints the held-out loss in bits per character (lower is better) as
``final val_bpc X`` and ``steps N``.

    python examples/char_lm.py                             # alone (world of one)
    python examples/char_lm.py --max-batch 0               # fixed batch B0
    adaptrun run --min-workers 1 --max-workers 2 -- python examples/char_lm.py
"""
from __future__ import annotations

import argparse
import ast
import math
import os

import torch
from torch import nn

import adaptrun
import adaptrun.scaling

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))       # printable ASCII; others -> "?"
BLOCK_CHARS = 2048


def stdlib_docstrings(max_chars: int) -> str:
    """Docstrings of the standard library's top-level modules, sorted by file name."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
                    total += len(doc) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    return torch.tensor([index.get(c, unknown) for c in text.replace("\t", "    ")],
                        dtype=torch.long)


class Windows(torch.utils.data.Dataset):
    """Item i: ``context + seq_len`` characters; the model predicts the last ``seq_len``."""

    def __init__(self, ids: torch.Tensor, context: int, seq_len: int):
        n = (len(ids) - context) // seq_len
        self.x = ids[:context + n * seq_len].unfold(0, context + seq_len, seq_len)[:n].clone()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]

    def __getitems__(self, idx):     # one gather per micro-batch instead of one per item
        return list(self.x[torch.as_tensor(idx)])


def split_corpus(corpus_kb: int, context: int, seq_len: int) -> tuple[Windows, Windows]:
    ids = encode(stdlib_docstrings(corpus_kb * 1024))
    blocks = ids.split(BLOCK_CHARS)
    train = torch.cat([b for i, b in enumerate(blocks) if i % 10 != 9])
    held = torch.cat([b for i, b in enumerate(blocks) if i % 10 == 9])
    return Windows(train, context, seq_len), Windows(held, context, seq_len)


class WindowMLP(nn.Module):
    """Logits for position t from characters t-context .. t-1: an embedding, then a two-layer
    MLP over the window (a convolution of width ``context`` and 1x1 convolutions)."""

    def __init__(self, context: int, embed: int = 16, hidden: int = 192):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(len(VOCAB), embed)
        self.mlp = nn.Sequential(nn.Conv1d(embed, hidden, context), nn.ReLU(),
                                 nn.Conv1d(hidden, hidden, 1), nn.ReLU(),
                                 nn.Conv1d(hidden, len(VOCAB), 1))

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars (B, context + L - 1) -> logits (B, vocab, L)."""
        return self.mlp(self.embed(chars).transpose(1, 2))


def bits_per_char(net: nn.Module, windows: torch.Tensor, context: int) -> float:
    loss = nn.functional.cross_entropy(net(windows[:, :-1]), windows[:, context:])
    return loss.item() / math.log(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--length", choices=("epochs", "progress"), default="epochs",
                   help="epochs: run --epochs epochs; progress: run until the training "
                        "progress of --epochs epochs at B0 (adaptrun.remaining_epochs(by=))")
    p.add_argument("--batch-size", type=int, default=32, help="initial global batch B0")
    p.add_argument("--lr", type=float, default=5e-3,
                   help="Adam LR tuned at --lr-batch (adaptrun scales it with the batch)")
    p.add_argument("--lr-batch", type=int, default=0,
                   help="the batch --lr was tuned at, if not --batch-size: the script scales "
                        "--lr by the square-root rule to --batch-size, warmed up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=512,
                   help="largest global batch the controller may choose (0: fixed batch)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--corpus-kb", type=int, default=200)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32, help="positions predicted per example")
    p.add_argument("--device", default=None,
                   help="where to train: cpu, cuda or cuda:N (default: ADAPTRUN_DEVICE, else "
                        "the worker's GPU when CUDA is available, else cpu)")
    args = p.parse_args()
    torch.set_num_threads(1)

    world = adaptrun.init(device=args.device)
    device = torch.device(world.device)
    torch.manual_seed(args.seed)
    train, held_out = split_corpus(args.corpus_kb, args.context, args.seq_len)
    net = WindowMLP(args.context).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    rule = adaptrun.scaling.SqrtScale(warmup_steps=args.warmup_steps)
    model = adaptrun.AdaptiveDataParallel(net, optimizer, scaling_rule=rule)
    # adaptrun scales the LR from B0 = --batch-size on; when B0 is not the batch the LR was
    # tuned at, the script scales it to B0 by the same rule, ramped up from --lr
    b0_factor = rule.target(args.batch_size / (args.lr_batch or args.batch_size), 1.0)

    def lr_at_b0(step: int) -> float:
        return args.lr * adaptrun.scaling.linear_ramp(step, 0, args.warmup_steps,
                                                      min(1.0, b0_factor), b0_factor)

    loader = adaptrun.AdaptiveDataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed)
    if args.max_batch > 0:
        loader.autoscale_batch_size(args.max_batch, local_batch_bounds=(8, 256),
                                    accumulation=True)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in adaptrun.remaining_epochs(args.epochs, by=args.length):
        for chars in loader:
            chars = chars.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at_b0(model.step)
            loss = loss_fn(model(chars[:, :-1]), chars[:, args.context:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.record_loss(loss)

    if world.rank == 0:               # the whole held-out text, on rank 0 only
        net.eval()
        with torch.no_grad():
            bpc = bits_per_char(net, held_out.x.to(device), args.context)
        adaptrun.record_metric("val_bpc", bpc)
        print(f"held-out {bpc:.4f} bits/char over {held_out.x.shape[0] * args.seq_len} chars "
              f"after {model.step} steps, progress {model.progress:.0f}, final batch "
              f"{loader.current_batch_size}, noise scale {model.noise_scale:.0f}")
        print(f"final val_bpc {bpc:.4f}")
        print(f"steps {model.step}")
        print(f"epochs {epoch + 1}")


if __name__ == "__main__":
    main()
