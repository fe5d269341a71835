"""Predict the next character of English text (Python's own docstrings) with a small causal
transformer, AdamW and a warmup-cosine LR schedule run on examples seen: an adaptrun
language model.

Shows a torch LR scheduler under an adaptive batch. The schedule is a ``LambdaLR`` (linear
warmup over ``--warmup-steps``, then cosine decay to ``--final-lr-frac`` x the LR) built for
the whole run at B0: ``epochs * len(train) / B0`` B0-steps of examples. Wrapped as
``ProgressSchedule(lambda_lr, by="examples")`` and passed as
``AdaptiveDataParallel(lr_scheduler=...)``, it is advanced by the wrapper after each optimizer
step to ``examples / B0``: a step at a batch of 8 x B0 moves it 8 steps, so it ends its decay
at the end of the epochs whatever batch the controller chose. The script never steps it nor
sets the LR; ``SqrtScale`` multiplies the LR the schedule sets by sqrt(B/B0), warmed up.
``--schedule steps`` drives the same ``LambdaLR`` by optimizer steps instead (the script calls
its ``step()`` after each optimizer step and registers it with ``adaptrun.register_state``):
when the batch grows, the run ends before the decay does.

The text and its split are ``char_lm.py``'s (the standard library's docstrings up to
``--corpus-kb`` KB, every 10th 2 KB block held out); an example is ``--seq-len`` + 1
characters, and the model predicts each of the last ``--seq-len`` from the ones before it
(teacher forcing, the loss averaged over positions). The model: a character embedding plus a
learned position embedding, ``--layers`` pre-LN blocks (causal ``nn.MultiheadAttention`` with
``--heads`` heads, then a 4x GELU MLP, no dropout), a final LayerNorm and a linear head
whose bias starts at the log frequencies of the training characters (the unigram model).

Rank 0 prints the held-out loss in bits per character (lower is better) as
``final val_bpc X``, ``steps N``, and ``final_lr_frac F``: the LR the schedule has set after
the last optimizer step over the LR at B0 (``--lr``, times the square-root factor when
``--lr-batch`` is given). With the default schedule it is ``--final-lr-frac`` at the end of
the epochs, fixed batch or grown.

    python examples/transformer_lm.py                      # alone (world of one)
    python examples/transformer_lm.py --max-batch 0        # fixed batch B0
    python examples/transformer_lm.py --schedule steps     # the schedule on optimizer steps
    adaptrun run --min-workers 1 --max-workers 2 -- python examples/transformer_lm.py
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import adaptrun
import adaptrun.scaling
from char_lm import VOCAB, split_corpus


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)) with a causal mask, then x + MLP(LN(x))."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Logits for position t from characters 0 .. t of the input."""

    def __init__(self, seq_len: int, d_model: int, heads: int, layers: int,
                 char_counts: torch.Tensor | None = None):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, len(VOCAB))
        for weight in (self.embed.weight, self.pos.weight, self.head.weight):
            nn.init.normal_(weight, std=0.02)
        if char_counts is not None:   # start at the unigram model: bias = log frequencies
            with torch.no_grad():
                self.head.bias.copy_(torch.log((char_counts + 1) / (char_counts + 1).sum()))
        # True above the diagonal: position t attends to positions 0 .. t only
        self.register_buffer("mask", torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars (B, L) -> logits (B, L, vocab)."""
        length = chars.shape[1]
        x = self.embed(chars) + self.pos.weight[:length]
        mask = self.mask[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def make_model(seq_len: int, d_model: int = 64, heads: int = 4, layers: int = 2,
               char_counts: torch.Tensor | None = None) -> CausalTransformer:
    return CausalTransformer(seq_len, d_model, heads, layers, char_counts)


def make_optimizer(net: nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))


def lm_loss(net: nn.Module, chars: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-character cross-entropy of windows chars (B, L + 1): each of the last L
    characters predicted from the ones before it, averaged over positions (or summed)."""
    logits = net(chars[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), chars[:, 1:].flatten(),
                                       reduction=reduction)


def bits_per_char(net: nn.Module, windows: torch.Tensor, chunk: int = 256) -> float:
    """Mean next-character loss over all held-out windows, in bits, ``chunk`` windows at once."""
    total = sum(lm_loss(net, part, reduction="sum").item() for part in windows.split(chunk))
    return total / (windows.shape[0] * (windows.shape[1] - 1)) / math.log(2)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_frac: float) -> float:
    """LR multiplier at schedule step ``step``: linear warmup to 1 over ``warmup_steps``, then
    a cosine to ``final_frac`` at ``total_steps`` (and ``final_frac`` after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--length", choices=("epochs", "progress"), default="epochs",
                   help="epochs: run --epochs epochs; progress: run until the training "
                        "progress of --epochs epochs at B0 (adaptrun.remaining_epochs(by=))")
    p.add_argument("--batch-size", type=int, default=32, help="initial global batch B0")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak AdamW LR tuned at --lr-batch (adaptrun scales it with the batch)")
    p.add_argument("--lr-batch", type=int, default=0,
                   help="the batch --lr was tuned at, if not --batch-size: the script scales "
                        "--lr by the square-root rule to --batch-size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=512,
                   help="largest global batch the controller may choose (0: fixed batch)")
    p.add_argument("--warmup-steps", type=int, default=50,
                   help="B0 steps of linear LR warmup (the schedule's and SqrtScale's)")
    p.add_argument("--final-lr-frac", type=float, default=0.1,
                   help="the cosine decays to this fraction of the peak LR")
    p.add_argument("--schedule", choices=("progress", "steps"), default="progress",
                   help="run the LR schedule on examples / B0 (adaptrun's ProgressSchedule) "
                        "or on optimizer steps")
    p.add_argument("--corpus-kb", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=64, help="positions predicted per example")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)

    world = adaptrun.init()
    torch.manual_seed(args.seed)
    train, held_out = split_corpus(args.corpus_kb, 1, args.seq_len)   # seq_len + 1 chars
    counts = torch.bincount(train.x[:, 1:].flatten(), minlength=len(VOCAB)).float()
    net = make_model(args.seq_len, args.d_model, args.heads, args.layers, counts)
    rule = adaptrun.scaling.SqrtScale(warmup_steps=args.warmup_steps)
    # adaptrun scales the LR from B0 = --batch-size on; when B0 is not the batch the LR was
    # tuned at, the script scales it to B0 by the same rule (the schedule's warmup ramps it)
    lr_b0 = args.lr * rule.target(args.batch_size / (args.lr_batch or args.batch_size), 1.0)
    optimizer = make_optimizer(net, lr_b0)
    # the run's length at B0: in B0-steps of examples on progress, in optimizer steps else
    total_steps = (args.epochs * len(train) // args.batch_size if args.schedule == "progress"
                   else args.epochs * math.ceil(len(train) / args.batch_size))
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, args.warmup_steps, total_steps, args.final_lr_frac))
    if args.schedule == "progress":
        # a run by progress ends its schedule on progress: both end together
        sched = adaptrun.scaling.ProgressSchedule(
            lambda_lr, by="progress" if args.length == "progress" else "examples")
        model = adaptrun.AdaptiveDataParallel(net, optimizer, lr_scheduler=sched,
                                              scaling_rule=rule)
    else:
        model = adaptrun.AdaptiveDataParallel(net, optimizer, scaling_rule=rule)
        adaptrun.register_state("lr_scheduler", lambda_lr)

    loader = adaptrun.AdaptiveDataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed)
    if args.max_batch > 0:
        loader.autoscale_batch_size(args.max_batch, local_batch_bounds=(8, 256),
                                    accumulation=True)
    for epoch in adaptrun.remaining_epochs(args.epochs, by=args.length):
        for chars in loader:
            loss = lm_loss(model, chars)
            optimizer.zero_grad()
            loss.backward()
            stepped_from = model.step
            optimizer.step()                  # a no-op on all but a step's last micro-batch
            if args.schedule == "steps" and model.step != stepped_from:
                lambda_lr.step()
            model.record_loss(loss)

    if world.rank == 0:               # the whole held-out text, on rank 0 only
        net.eval()
        with torch.no_grad():
            bpc = bits_per_char(net, held_out.x)
        lr_frac = optimizer.param_groups[0]["lr"] / lr_b0
        adaptrun.record_metric("val_bpc", bpc)
        print(f"held-out {bpc:.4f} bits/char over {held_out.x.shape[0] * args.seq_len} chars "
              f"after {model.step} steps, progress {model.progress:.0f}, final batch "
              f"{loader.current_batch_size}, noise scale {model.noise_scale:.0f}, "
              f"LR {lr_frac:.3f} x peak ({args.schedule} schedule)")
        print(f"final val_bpc {bpc:.4f}")
        print(f"steps {model.step}")
        print(f"epochs {epoch + 1}")
        print(f"final_lr_frac {lr_frac:.4f}")


if __name__ == "__main__":
    main()
