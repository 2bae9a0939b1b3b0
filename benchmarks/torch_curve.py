"""PyTorch's quality-per-minute curve on tinyshakespeare, for comparison with charrnn's recipe.

The same data as ``charrnn train``: characters plus start/end tokens, the last 10% of the
stream held out, the training text laid out as ``batch`` parallel streams read ``seq_len``
characters at a time with the hidden state carried across batches (detached). The model is
the benchmark's PyTorch peer (``torch_peer.CharRNN``: ``nn.LSTM``/``nn.GRU`` over one-hot
input, a linear head), Adam (AdamW with --weight-decay) with global-norm clipping 5, optional
dropout between layers.
Validation loss (nats/char over the whole held-out tenth, 64 streams, each first reading
the characters before it as charrnn's evaluation does) is printed as one JSON
line per evaluation, with the minutes of training so far (evaluation time excluded).
The process is tuned as ``charrnn train`` tunes its own (``torch_peer.tune_process``: glibc
malloc options and huge-page tunable); ``--untuned`` runs it as a plain script.

    python benchmarks/torch_curve.py ../shared/corpora/tinyshakespeare.txt --minutes 10 \\
        --hidden 256 --batch 64 --seq-len 100 --lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_peer import CharRNN, _detach, tune_process  # noqa: E402

from charrnn.evaluate import EVAL_WARMUP  # noqa: E402


def encode(text: str):
    chars = sorted(set(text))
    ids = {c: i + 2 for i, c in enumerate(chars)}  # 0 start, 1 end, as charrnn
    stream = np.array([0] + [ids[c] for c in text] + [1], dtype=np.int64)
    return stream, len(chars) + 2


@torch.no_grad()
def val_loss(model, stream: np.ndarray, streams: int, seq_len: int, warmup: int = 0) -> float:
    """Mean loss over ``streams`` contiguous rows of ``stream``, each row first reading (unscored)
    the ``warmup`` characters before it, as charrnn's evaluation does."""
    model.eval()
    n = (len(stream) - 1) // streams
    warmup = min(warmup, n * (streams - 1))
    # Every row reads n + warmup characters: row 0 its own n and then the start of row 1 (not
    # scored there), row r > 0 the warmup characters before its own n.
    lo = [0] + [r * n - warmup for r in range(1, streams)]
    x = torch.from_numpy(np.stack([stream[a:a + n + warmup] for a in lo]))
    y = torch.from_numpy(np.stack([stream[a + 1:a + n + warmup + 1] for a in lo]))
    scored = torch.zeros(streams, n + warmup)
    scored[0, :n] = 1
    scored[1:, warmup:] = 1
    h, total, count = None, 0.0, 0.0
    for t in range(0, n + warmup, seq_len):
        logits, h = model(x[:, t:t + seq_len], h)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y[:, t:t + seq_len].reshape(-1),
                              reduction="none")
        w = scored[:, t:t + seq_len].reshape(-1)
        total += float((nll * w).sum())
        count += float(w.sum())
    model.train()
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cosine-steps", type=int, default=0,
                   help="decay the learning rate to a tenth over this many steps by a cosine, as "
                        "charrnn's --lr-schedule cosine --max-steps N; 0 keeps it constant")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay (torch.optim.AdamW), as charrnn's --optimizer adamw --weight-decay")
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--bf16", action="store_true",
                   help="train and evaluate under torch.autocast(\"cpu\", torch.bfloat16), as charrnn's --dtype bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed: the initial weights")
    p.add_argument("--untuned", action="store_true",
                   help="skip the process tuning charrnn's training gets (torch_peer.tune_process)")
    a = p.parse_args(argv)
    if not a.untuned:
        tuned = tune_process()  # may re-execute this script first, with glibc's huge-page tunable
        print(json.dumps({"process": tuned}), flush=True)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    stream, vocab = encode(Path(a.corpus).read_text(encoding="utf-8"))
    n_val = int(len(stream) * 0.1)
    train, val = stream[:-n_val], stream[-n_val:]
    model = CharRNN(a.cell, a.layers, a.hidden, vocab)
    if a.dropout:
        model.rnn.dropout = a.dropout
    opt = (torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay) if a.weight_decay
           else torch.optim.Adam(model.parameters(), lr=a.lr))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.cosine_steps, eta_min=a.lr / 10)
             if a.cosine_steps else None)
    per_row = (len(train) - 1) // a.batch
    rows_x = torch.from_numpy(train[:per_row * a.batch].reshape(a.batch, per_row))
    rows_y = torch.from_numpy(train[1:per_row * a.batch + 1].reshape(a.batch, per_row))
    steps_per_epoch = per_row // a.seq_len
    h, trained_s, step = None, 0.0, 0
    while trained_s < a.minutes * 60:
        t0 = time.perf_counter()
        i = step % steps_per_epoch
        if i == 0:
            h = None
        sl = slice(i * a.seq_len, (i + 1) * a.seq_len)
        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            logits, h = model(rows_x[:, sl], h)
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), rows_y[:, sl].reshape(-1))
        h = _detach(h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if sched is not None and step < a.cosine_steps:
            sched.step()
        step += 1
        trained_s += time.perf_counter() - t0
        if step % a.eval_every == 0 or trained_s >= a.minutes * 60:
            with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
                v = val_loss(model, val, 64, a.seq_len, EVAL_WARMUP)
            print(json.dumps({"step": step, "minutes": round(trained_s / 60, 2), "chars": step * a.batch * a.seq_len,
                              "train_loss": round(loss.item(), 4), "val_loss": round(v, 4),
                              "val_bits": round(v / math.log(2), 4)}), flush=True)


if __name__ == "__main__":
    main()
