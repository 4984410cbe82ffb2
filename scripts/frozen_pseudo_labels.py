#!/usr/bin/env python3
"""Pseudo-labels on a frozen encoder's features: do they beat a head trained on the bought labels?

An exploration, not part of frugal: it reads `frugal embed` arrays and the bought labels of
finished `frugal finetune` runs (the `ledger` table of each run's labels.db: labels that were
bought, nothing else), and trains small heads in PyTorch. The test labels are read for the report
only; every choice (early stopping) uses a validation slice of the bought labels.

Per run (one seed each), with the same 80/20 split of its bought labels:
  head          a 256-unit MLP head on the standardized features (the baseline; frugal's rounds
                train the same head, plus augmented copies);
  self-train    the head's confident predictions (top half of each predicted class) over the
                whole pool become pseudo-labels, and a fresh head trains on them with the bought
                labels;
  lp-head       label propagation (Zhou et al. 2004; weights as in Iscen et al. 2019) of the
                bought labels on the k-NN graph of the head's hidden layer; every pool image gets
                the propagated class, weighted by certainty and class balance;
  lp-features   the same on the k-NN graph of the features themselves (PCA to 256 dims).

usage: frozen_pseudo_labels.py --embeddings DIR --runs RUN_DIR... [--data-dir DIR] [--threads 2]
"""
import argparse
import gzip
import os
import sqlite3
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = 10


def load_features(d):
    pool = torch.from_numpy(np.load(os.path.join(d, "train.npy")))
    test = torch.from_numpy(np.load(os.path.join(d, "test.npy")))
    # Standardize with the pool's statistics (label-free), as frugal's heads see them.
    mean, std = pool.mean(0), pool.std(0)
    return (pool - mean) / (std + 1e-3), (test - mean) / (std + 1e-3)


def test_labels(data_dir, n):
    with gzip.open(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8).astype(np.int64)
    return torch.from_numpy(labels[:n])


def bought(run_dir):
    """The bought labels of a finetune run: its ledger, in purchase order."""
    db = sqlite3.connect(f"file:{os.path.join(run_dir, 'labels.db')}?mode=ro", uri=True)
    return [(int(i), int(l)) for i, l in db.execute("SELECT item, label FROM ledger ORDER BY seq")]


def split(rows, seed, validation=0.2):
    order = np.random.default_rng(seed).permutation(len(rows))
    nv = int(round(validation * len(rows)))
    pick = lambda ix: (torch.tensor([rows[i][0] for i in ix]), torch.tensor([rows[i][1] for i in ix]))
    return pick(order[nv:]), pick(order[:nv])


class Head(torch.nn.Module):
    def __init__(self, dim, hidden=256, dropout=0.3):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, CLASSES)
        self.dropout = torch.nn.Dropout(dropout)

    def embed(self, x):
        return torch.relu(self.l1(x))

    def forward(self, x):
        return self.l2(self.dropout(self.embed(x)))


@torch.no_grad()
def predict(head, x, fn="probs"):
    head.eval()
    out = [(torch.softmax(head(c), 1) if fn == "probs" else head.embed(c)) for c in x.split(8192)]
    return torch.cat(out)


def train_head(x, items, labels, weights, val, seed, batch, epochs, patience, min_steps=20):
    """Adam on weighted cross-entropy; keeps the epoch with the best validation accuracy."""
    torch.manual_seed(seed)
    head = Head(x.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    (vi, vy), n = val, len(items)
    best, since = (-1.0, None, 0), 0
    for epoch in range(1, epochs + 1):
        head.train()
        steps = max(-(-n // batch), min_steps)
        order = torch.cat([torch.randperm(n) for _ in range(steps * batch // n + 1)])
        for b in order[: max(n, steps * batch)].split(batch):
            loss = F.cross_entropy(head(x[items[b]]), labels[b], reduction="none")
            loss = (loss * weights[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = (predict(head, x[vi]).argmax(1) == vy).float().mean().item()
        if acc > best[0]:
            best, since = (acc, {k: v.clone() for k, v in head.state_dict().items()}, epoch), 0
        else:
            since += 1
            if since >= patience:
                break
    head.load_state_dict(best[1])
    return head, best[0]


def knn_graph(e, k):
    e = F.normalize(e, dim=1)
    idx, sim = torch.empty(len(e), k, dtype=torch.long), torch.empty(len(e), k)
    for start in range(0, len(e), 4096):
        s = e[start : start + 4096] @ e.T
        rows = torch.arange(s.shape[0])
        s[rows, rows + start] = -2.0  # not its own neighbour
        sim[start : start + 4096], idx[start : start + 4096] = s.topk(k, 1)
    return idx, sim


def propagate(idx, sim, seeds, alpha=0.99, gamma=3.0, iters=40):
    """Class scores [n, classes] from the seeds [(item, label)] diffused on the k-NN graph."""
    n, k = idx.shape
    w = sim.clamp(min=0) ** gamma
    rows = torch.arange(n).repeat_interleave(k)
    g = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), w.reshape(-1), (n, n))
    g = (g + g.t()).coalesce()
    dinv = torch.sparse.sum(g, 1).to_dense().clamp(min=1e-12).rsqrt()
    i = g.indices()
    s = torch.sparse_coo_tensor(i, g.values() * dinv[i[0]] * dinv[i[1]], (n, n)).coalesce()
    y = torch.zeros(n, CLASSES)
    for item, label in seeds:
        y[item, label] = 1.0
    y = y / y.sum(0, keepdim=True).clamp(min=1)  # each class seeds the same mass
    z = y.clone()
    for _ in range(iters):
        z = alpha * torch.sparse.mm(s, z) + (1 - alpha) * y
    return z


def propagated_targets(z):
    """Every pool image with its propagated class, weighted by certainty and class balance."""
    p = z / z.sum(1, keepdim=True).clamp(min=1e-12)
    certainty = 1 + (p * torch.log(p + 1e-12)).sum(1) / np.log(CLASSES)
    labels = z.argmax(1)
    counts = torch.bincount(labels, minlength=CLASSES).float().clamp(min=1)
    return torch.arange(len(z)), labels, certainty * (len(z) / CLASSES / counts[labels])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embeddings", required=True, help="a `frugal embed` output directory")
    ap.add_argument("--runs", nargs="+", required=True, help="finished finetune run directories")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--neighbours", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pool, test = load_features(a.embeddings)
    ty = test_labels(a.data_dir, len(test))
    pca_graph = None
    results = {}
    for run_no, run in enumerate(a.runs):
        seed = run_no + 1
        (ti, tl), val = split(bought(run), seed)
        ones = torch.ones(len(ti))
        t0 = time.time()
        teacher, va = train_head(pool, ti, tl, ones, val, seed, 64, 60, 12)
        report = {"head": (va, teacher)}

        def student(items, labels, weights):
            return train_head(
                pool,
                torch.cat([ti, items]),
                torch.cat([tl, labels]),
                torch.cat([ones, weights]),
                val,
                seed,
                256,
                15,
                4,
                min_steps=0,
            )[::-1]

        probs = predict(teacher, pool)
        conf, pred = probs.max(1)
        keep = []
        for c in range(CLASSES):
            members = (pred == c).nonzero().squeeze(1)
            keep.append(members[conf[members].argsort(descending=True)[: len(members) // 2]])
        keep = torch.cat(keep)
        report["self-train"] = student(keep, pred[keep], torch.ones(len(keep)))

        graph = knn_graph(predict(teacher, pool, "embed"), a.neighbours)
        seeds = list(zip(ti.tolist(), tl.tolist()))
        report["lp-head"] = student(*propagated_targets(propagate(*graph, seeds)))

        if pca_graph is None:
            _, _, v = torch.pca_lowrank(pool, q=256, center=True, niter=3)
            pca_graph = knn_graph((pool - pool.mean(0)) @ v, a.neighbours)
        report["lp-features"] = student(*propagated_targets(propagate(*pca_graph, seeds)))

        line = [f"{os.path.basename(run.rstrip('/'))} (split seed {seed}):"]
        for name, (v, head) in report.items():
            acc = (predict(head, test).argmax(1) == ty).float().mean().item()
            results.setdefault(name, []).append((v, acc))
            line.append(f"{name} val {100 * v:.1f} test {100 * acc:.2f}")
        print(" | ".join(line) + f" ({time.time() - t0:.0f} s)", flush=True)

    print("\n| method | validation accuracy | test accuracy (report only) |\n|---|---|---|")
    for name, r in results.items():
        r = 100 * np.array(r)
        sd = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0
        print(f"| {name} | {r[:, 0].mean():.1f} ± {sd(r[:, 0]):.1f} | {r[:, 1].mean():.2f} ± {sd(r[:, 1]):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
