#!/usr/bin/env python3
"""PyTorch reference for `fedmq bench train`: CPU training throughput of `rnn` and `mf`.

This script measures what `fedmq bench train` measures, but in PyTorch, so the two can be
compared on the same machine. One step is: zero the gradients, forward, loss, backward, and
one plain SGD step (lr 0.01, no momentum, no weight decay). The batches are synthetic,
generated once before timing and reused by every step. There are 2 untimed warm-up runs,
then `--runs` timed runs (default 5) of `--steps` steps each. The script reports the median
samples/s over the timed runs, and the slowest and fastest run.
Threads: `torch.set_num_threads(--threads)` (default 2) and `torch.set_num_interop_threads(1)`.

Models:
  rnn  FedML's RNN_OriginalFedAvg (Shakespeare next character): Embedding(81, 8) ->
       LSTM(8, 256, num_layers=2, batch_first=True) -> the output at the last time step ->
       Linear(256, 81); loss F.cross_entropy. Input: random token ids [batch, 80], targets
       [batch]. PyTorch's default initialization. 820,185 parameters.
  mf   Biased matrix factorization (MovieLens-100k sizes: 943 users, 1682 items, K = 32):
       pred = <P[u], Q[i]> + bu[u] + bi[i] + mu, where mu = 3.53 (a constant, not a parameter);
       loss = mean over the batch of (pred - r)^2 + lambda * (|P[u]|^2 + |Q[i]|^2 + bu[u]^2
       + bi[i]^2), with lambda = 0.05. Embedding gradients are dense (PyTorch's default,
       sparse=False). Factors start from N(0, 0.1^2) and biases at zero, as fedmq's `mf` does.
       Inputs: random user ids, item ids, and integer ratings in 1..5.
       86,625 parameters. fedmq's `mf` also learns a 1-element `global_bias`, so it has 86,626.

Set-up (CPU; the default `torch` wheel also installs the nvidia-* packages, and it does not
import without them, so install it normally):

    python3 -m venv torchvenv
    torchvenv/bin/pip install torch

Run (from the repository root):

    torchvenv/bin/python scripts/torch_bench.py --model rnn --batch 32
    torchvenv/bin/python scripts/torch_bench.py --model mf --batch 256 --threads 2 --steps 200 --runs 5

For each run, the script prints one JSON object on its own line: model, batch, threads
(torch.get_num_threads()), interop_threads, samples_per_s (median), samples_per_s_min,
samples_per_s_max, runs, steps_per_run, warmup, params, torch (version).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SEQ_LEN = 80
VOCAB = 81
USERS, ITEMS, DIM = 943, 1682, 32
MU, LAMBDA = 3.53, 0.05
LR = 0.01
WARMUP = 2
DEFAULT_STEPS = {"rnn": 20, "mf": 200}


class RNNOriginalFedAvg(nn.Module):
    """FedML's RNN_OriginalFedAvg."""

    def __init__(self, embedding_dim=8, vocab_size=VOCAB, hidden_size=256):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        out, _ = self.lstm(self.embeddings(x))
        return self.fc(out[:, -1, :])


class MatrixFactorization(nn.Module):
    """Biased MF with a constant global mean and per-sample L2 regularization."""

    def __init__(self):
        super().__init__()
        self.user_embedding = nn.Embedding(USERS, DIM)
        self.user_bias = nn.Embedding(USERS, 1)
        self.item_embedding = nn.Embedding(ITEMS, DIM)
        self.item_bias = nn.Embedding(ITEMS, 1)
        nn.init.normal_(self.user_embedding.weight, 0.0, 0.1)
        nn.init.normal_(self.item_embedding.weight, 0.0, 0.1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def loss(self, u, i, r):
        p = self.user_embedding(u)
        q = self.item_embedding(i)
        bu = self.user_bias(u).squeeze(-1)
        bi = self.item_bias(i).squeeze(-1)
        pred = (p * q).sum(-1) + bu + bi + MU
        reg = p.pow(2).sum(-1) + q.pow(2).sum(-1) + bu.pow(2) + bi.pow(2)
        return ((pred - r).pow(2) + LAMBDA * reg).mean()


def make_step(model_name, batch):
    """The model and a closure doing one training step on a fixed synthetic batch."""
    torch.manual_seed(0)
    if model_name == "rnn":
        model = RNNOriginalFedAvg()
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=g)
        y = torch.randint(0, VOCAB, (batch,), generator=g)

        def loss_fn():
            return F.cross_entropy(model(x), y)

    elif model_name == "mf":
        model = MatrixFactorization()
        g = torch.Generator().manual_seed(1)
        u = torch.randint(0, USERS, (batch,), generator=g)
        i = torch.randint(0, ITEMS, (batch,), generator=g)
        r = torch.randint(1, 6, (batch,), generator=g).to(torch.float32)

        def loss_fn():
            return model.loss(u, i, r)

    else:
        raise ValueError(f"unknown model {model_name!r} (rnn | mf)")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    params = sum(p.numel() for p in model.parameters())
    return step, params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=["rnn", "mf"])
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0: 20 for rnn, 200 for mf)")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if a.batch < 1 or a.runs < 1 or a.steps < 0 or a.threads < 1:
        ap.error("--batch, --runs and --threads must be at least 1, --steps at least 0")
    steps = a.steps or DEFAULT_STEPS[a.model]

    # Interop threads must be set before any inter-op parallel work starts.
    torch.set_num_interop_threads(1)
    torch.set_num_threads(a.threads)

    step, params = make_step(a.model, a.batch)
    rates = []
    for run in range(WARMUP + a.runs):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        secs = time.perf_counter() - start
        if run >= WARMUP:
            rates.append(a.batch * steps / max(secs, 1e-12))
    print(
        json.dumps(
            {
                "model": a.model,
                "batch": a.batch,
                "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "samples_per_s": statistics.median(rates),
                "samples_per_s_min": min(rates),
                "samples_per_s_max": max(rates),
                "runs": a.runs,
                "steps_per_run": steps,
                "warmup": WARMUP,
                "params": params,
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
