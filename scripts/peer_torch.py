"""PyTorch peer for speed ratios: the reference VAE and SimCLR training steps, and the
pool-scoring forward pass of active learning (plain and with MC dropout).

A copy of ../shared/bench/peer_torch.py (the models, loss, optimizer, batch and timing protocol of
../shared/notes/burn-cpu.md, unchanged) with two additions for `frugal bench speed`:
- `score` / `mc-dropout`: the reference encoder and the classifier head of `frugal finetune`
  (6272 -> 256 -> ReLU -> [dropout] -> 10), eval mode, no autograd, batch 1024 by default, class
  probabilities copied to the host; `mc-dropout` adds 10 dropout samples of the head per batch;
- `--device cpu|cuda` (default cpu), for the GPU comparison of scripts/gpu-check.sh, and
  `--data-dir DIR` for a machine without the Debian package.

usage: python peer_torch.py <vae|simclr|score|mc-dropout> [batch] [warmup=5] [steps=30] [--device cpu|cuda]
       [--data-dir DIR]  (default /usr/share/datasets/fashion-mnist)
prints one line: RESULT framework=torch-<version> model=... img_per_s=... epoch60k_s=... maxrss_kb=...
"""
import gzip, struct, sys, time, resource
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
DEVICE = "cpu"
MC_SAMPLES = 10
DATA_DIR = "/usr/share/datasets/fashion-mnist"
LATENT, FEAT = 32, 128 * 7 * 7


def load():
    with gzip.open(DATA_DIR + "/train-images-idx3-ubyte.gz", "rb") as f:
        buf = f.read()
    magic, n, h, w = struct.unpack(">IIII", buf[:16])
    assert magic == 0x803
    return np.frombuffer(buf, np.uint8, offset=16).reshape(n, 1, h, w).astype(np.float32) / 255.0


class Encoder(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(1, 32, 3, padding=1)
        s.c2 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        s.c3 = nn.Conv2d(64, 128, 4, stride=2, padding=1)

    def forward(s, x):
        x = F.relu(s.c1(x)); x = F.relu(s.c2(x)); x = F.relu(s.c3(x))
        return x.flatten(1)


class Vae(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = Encoder()
        s.mu = nn.Linear(FEAT, LATENT); s.logvar = nn.Linear(FEAT, LATENT)
        s.fc = nn.Linear(LATENT, FEAT)
        s.t1 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)
        s.t2 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        s.out = nn.Conv2d(32, 1, 3, padding=1)

    def loss(s, x):
        b = x.shape[0]
        h = s.enc(x)
        mu, logvar = s.mu(h), s.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        y = F.relu(s.fc(z)).view(b, 128, 7, 7)
        y = F.relu(s.t1(y)); y = F.relu(s.t2(y))
        logits = s.out(y)  # sigmoid folded into BCE-with-logits
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / b
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / b
        return bce + kl


class SimClr(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = Encoder(); s.p1 = nn.Linear(FEAT, 256); s.p2 = nn.Linear(256, 128)

    def loss(s, views, diag_neg, pos_mask, temp=0.5):
        z = s.p2(F.relu(s.p1(s.enc(views))))
        z = F.normalize(z, dim=1)
        sim = z @ z.t() / temp + diag_neg
        return -(F.log_softmax(sim, 1) * pos_mask).sum() / views.shape[0]


class Scorer(nn.Module):
    """The reference encoder and finetune's two-layer head."""
    def __init__(s):
        super().__init__()
        s.enc = Encoder(); s.hidden = nn.Linear(FEAT, 256); s.out = nn.Linear(256, 10)

    def forward(s, x, mc):
        emb = F.relu(s.hidden(s.enc(x)))
        probs = [F.softmax(s.out(emb), 1)]
        probs += [F.softmax(s.out(F.dropout(emb, 0.3, training=True)), 1) for _ in range(mc)]
        return [p.cpu().numpy() for p in probs]


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def augment(imgs, rng):
    """imgs [M,1,28,28] -> shift +-3 (zero fill), hflip p=.5, brightness +U(-.2,.2), clip."""
    m = imgs.shape[0]
    pad = np.zeros((m, 34, 34), np.float32); pad[:, 3:31, 3:31] = imgs[:, 0]
    dx = rng.integers(-3, 4, m); dy = rng.integers(-3, 4, m)
    flip = rng.random(m) < 0.5; br = rng.uniform(-0.2, 0.2, m).astype(np.float32)
    ar = np.arange(28)
    rows = ar[None, :] - dy[:, None] + 3
    cols = np.where(flip[:, None], 30 - ar[None, :] + dx[:, None], ar[None, :] - dx[:, None] + 3)
    out = pad[np.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.clip(out + br[:, None, None], 0, 1)[:, None]


def main():
    global DEVICE, DATA_DIR
    args = sys.argv[1:]
    if "--device" in args:
        i = args.index("--device"); DEVICE = args[i + 1]; del args[i:i + 2]
    if "--data-dir" in args:
        i = args.index("--data-dir"); DATA_DIR = args[i + 1]; del args[i:i + 2]
    model_name = args[0] if len(args) > 0 else "vae"
    scoring = model_name in ("score", "mc-dropout")
    batch = int(args[1]) if len(args) > 1 else (1024 if scoring else 256)
    warmup = int(args[2]) if len(args) > 2 else 5
    steps = int(args[3]) if len(args) > 3 else 30
    dev = torch.device(DEVICE)
    torch.manual_seed(0); rng = np.random.default_rng(0)
    images = load(); n = images.shape[0]
    perm = rng.permutation(n); cur = 0
    if scoring:
        model = Scorer().to(dev).eval()
    else:
        model = (Vae() if model_name == "vae" else SimClr()).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # eps=1e-8, same as burn run
    if model_name == "simclr":
        n2 = 2 * batch
        diag_neg = torch.diag(torch.full((n2,), -1e9)).to(dev)
        pos_mask = torch.zeros(n2, n2); i = torch.arange(n2); pos_mask[i, (i + batch) % n2] = 1
        pos_mask = pos_mask.to(dev)
    times, losses, prep = [], [], 0.0
    for s in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        if cur + batch > n:
            perm = rng.permutation(n); cur = 0
        idx = perm[cur:cur + batch]; cur += batch
        xb = images[idx]
        if model_name == "simclr":
            x = torch.from_numpy(np.concatenate([augment(xb, rng), augment(xb, rng)])).to(dev)
        else:
            x = torch.from_numpy(xb).to(dev)
        if s >= warmup:
            prep += time.perf_counter() - t0
        if scoring:
            with torch.no_grad():
                model(x, MC_SAMPLES if model_name == "mc-dropout" else 0)
        else:
            opt.zero_grad(set_to_none=True)
            loss = model.loss(x) if model_name == "vae" else model.loss(x, diag_neg, pos_mask)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
    meas = sorted(times[warmup:]); tot = sum(meas); ips = batch * steps / tot
    loss_part = f"loss_first={losses[0]:.3f} loss_last={losses[-1]:.3f} " if losses else ""
    print(f"RESULT framework=torch-{torch.__version__}-{DEVICE} model={model_name} batch={batch} steps={steps} "
          f"img_per_s={ips:.1f} mean_step_s={tot/steps:.4f} median_step_s={meas[len(meas)//2]:.4f} "
          f"min_step_s={meas[0]:.4f} max_step_s={meas[-1]:.4f} first_step_s={times[0]:.3f} "
          f"prep_s_per_step={prep/steps:.4f} epoch60k_s={60000/ips:.1f} {loss_part}"
          f"maxrss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")


if __name__ == "__main__":
    main()
