"""Meta-learn a DeepMomentum memory on a family of digits tasks; compare on held-out tasks.

Task family: 5-way classification of 8x8 digits (scikit-learn ``load_digits``) by a fresh
MLP 64-32-5 (tanh), ``STEPS`` minibatch steps of 32 images. Meta-training tasks use class sets
drawn from digits 0-6; held-out tasks are class sets that contain at least one of 7, 8, 9 (classes
never seen in meta-training), each with its own network initialization and minibatch order.

What is learned (``deepopt.meta``): DeepMomentum's memory initialization (w1, b1, w2), its inner
step size and its momentum decay, by truncated unrolled differentiation of the mean training
loss over the run (segments of ``TRUNCATION`` steps, two tasks per outer step, Adam, meta-gradient
clipped at norm 1). The learning rate of every baseline is tuned on meta-training tasks (grid);
the meta-learned memory keeps the hand-set DeepMomentum's tuned rate, so the comparison of the
two DeepMomentums isolates the memory.

Evaluation: every optimizer runs as its ``torch.optim`` class on real ``nn.Module`` models, on
``HELD_OUT`` held-out tasks; the learned one is a plain ``deepopt.DeepMomentum`` that loaded the
``state_dict`` saved from ``learner.optimizer(...)`` (``learned_deep_momentum.pt``).

Run (5 to 9 minutes on a shared 2-core CPU, one torch thread: ``--threads``, default 1, as the
committed results): ``python -m benchmarks.meta_memory`` writes to a fresh ``./runs/meta-<time>/``;
``--update-results`` rewrites the committed ``benchmarks/results/meta/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

import deepopt
from deepopt.meta import MetaLearner, MetaTrainer

from .outdir import add_arguments as add_out_arguments, announce, run_dir

WAYS, STEPS, TRUNCATION, BATCH, HIDDEN = 5, 40, 10, 32, 32
META_STEPS, META_LR, TASKS_PER_STEP, TUNE_TASKS, HELD_OUT = 150, 0.03, 2, 6, 24
TRAIN_CLASSES, NEW_CLASSES = tuple(range(7)), (7, 8, 9)
GRIDS = {
    "SGD momentum 0.9": ("MomentumMemory", dict(momentum=0.9), (0.03, 0.1, 0.3, 1.0)),
    "AdamW": ("AdamMemory", dict(weight_decay=0.0), (1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
    "DeepMomentum (hand-set)": ("DeepMomentum", dict(momentum=0.9, inner_lr=0.1), (0.03, 0.1, 0.3, 1.0)),
}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


X, Y = digits()
HELD_OUT_TRIPLES = [t for t in itertools.combinations(range(10), WAYS) if set(t) & set(NEW_CLASSES)]
TRAIN_TRIPLES = list(itertools.combinations(TRAIN_CLASSES, WAYS))


class DigitsTask:
    """One run: a class set, a network initialization, a minibatch order (all from ``g``)."""

    def __init__(self, g: torch.Generator, triples=TRAIN_TRIPLES) -> None:
        classes = triples[int(torch.randint(len(triples), (1,), generator=g))]
        idx = torch.cat([torch.nonzero(Y == c).flatten() for c in classes])
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = len(idx) // 4
        self.classes = classes
        self.x_test, self.x_train = X[idx[:n_test]], X[idx[n_test:]]
        remap = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([remap[int(c)] for c in Y[idx]])
        self.y_test, self.y_train = labels[:n_test], labels[n_test:]
        self.batches = torch.randint(len(self.x_train), (STEPS, BATCH), generator=g)
        net = self.model_from(g)
        self.params = {k: v.detach() for k, v in net.named_parameters()}

    @staticmethod
    def model_from(g: torch.Generator) -> nn.Module:
        w1 = torch.randn(HIDDEN, 64, generator=g) / 8.0
        w2 = torch.randn(WAYS, HIDDEN, generator=g) / math.sqrt(HIDDEN)
        net = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WAYS))
        with torch.no_grad():
            net[0].weight.copy_(w1), net[0].bias.zero_(), net[2].weight.copy_(w2), net[2].bias.zero_()
        return net

    def loss(self, params, step: int) -> torch.Tensor:
        b = self.batches[step]
        h = torch.tanh(TF.linear(self.x_train[b], params["0.weight"], params["0.bias"]))
        return TF.cross_entropy(TF.linear(h, params["2.weight"], params["2.bias"]), self.y_train[b])

    def model(self) -> nn.Module:
        net = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WAYS))
        net.load_state_dict({k: v.clone() for k, v in self.params.items()})
        return net


def run_class(task: DigitsTask, make_opt) -> dict:
    """Train ``task``'s network with a torch.optim optimizer; loss curve, final loss, test accuracy."""
    net = task.model()
    opt = make_opt(net.parameters())
    curve = []
    for t in range(STEPS):
        b = task.batches[t]
        loss = TF.cross_entropy(net(task.x_train[b]), task.y_train[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    with torch.no_grad():
        final = float(TF.cross_entropy(net(task.x_train), task.y_train))
        acc = float((net(task.x_test).argmax(-1) == task.y_test).float().mean())
    return {"curve": curve, "mean_loss": sum(curve) / STEPS, "final_loss": final, "test_acc": acc}


def tasks(seed: int, n: int, triples) -> list[DigitsTask]:
    g = torch.Generator().manual_seed(seed)
    return [DigitsTask(g, triples) for _ in range(n)]


def tune(name: str, kw: dict, grid, tune_tasks) -> float:
    cls = deepopt.OPTIMIZERS[name]
    score = {lr: sum(run_class(t, lambda p: cls(p, lr=lr, **kw))["mean_loss"] for t in tune_tasks) for lr in grid}
    score = {lr: (s if math.isfinite(s) else float("inf")) for lr, s in score.items()}
    return min(score, key=score.get)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("mean_loss", "final_loss", "test_acc"):
        vals = torch.tensor([r[key] for r in runs])
        out[key] = {"mean": float(vals.mean()), "sem": float(vals.std() / math.sqrt(len(vals)))}
    out["curve"] = [sum(r["curve"][t] for r in runs) / len(runs) for t in range(STEPS)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_arguments(ap, "meta")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the committed results')")
    ap.add_argument("--meta-steps", type=int, default=META_STEPS)
    ap.add_argument("--meta-lr", type=float, default=META_LR)
    ap.add_argument("--tasks-per-step", type=int, default=TASKS_PER_STEP)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    given_out = args.out
    args.out = Path(run_dir("meta", args.out, args.update_results))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    tune_tasks = tasks(args.seed + 1, TUNE_TASKS, TRAIN_TRIPLES)
    best = {label: tune(name, kw, grid, tune_tasks) for label, (name, kw, grid) in GRIDS.items()}
    print("tuned learning rates:", best)

    learner = MetaLearner("DeepMomentum", lr=best["DeepMomentum (hand-set)"], momentum=0.9, inner_lr=0.1)
    trainer = MetaTrainer(learner, DigitsTask, unroll=STEPS, truncation=TRUNCATION, meta_lr=args.meta_lr, clip=1.0,
                          tasks_per_step=args.tasks_per_step, seed=args.seed + 2)
    history = []
    for i in range(args.meta_steps):
        stats = trainer.step()
        history.append(stats)
        if i % 10 == 0 or i == args.meta_steps - 1:
            print(f"meta step {i:3d}  meta-loss {stats['meta_loss']:.4f}  |grad| {stats['grad_norm']:.3f}  "
                  f"graph nodes {stats['graph_nodes']}")
    learned = learner.learned()
    # the learned memory leaves as an ordinary torch.optim state_dict, and comes back into the class
    torch.save(learner.optimizer([nn.Parameter(torch.zeros(1))]).state_dict(), args.out / "learned_deep_momentum.pt")
    sd = torch.load(args.out / "learned_deep_momentum.pt")
    group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}

    def learned_opt(params):
        params = list(params)
        opt = deepopt.DeepMomentum(params)
        opt.load_state_dict({"state": {}, "param_groups": [{**group, "params": list(range(len(params)))}]})
        return opt

    held_out = tasks(args.seed + 3, HELD_OUT, HELD_OUT_TRIPLES)
    makers = {label: (lambda p, n=name, k=kw, lr=best[label]: deepopt.OPTIMIZERS[n](p, lr=lr, **k))
              for label, (name, kw, _) in GRIDS.items()}
    makers["DeepMomentum (meta-learned)"] = learned_opt
    runs = {label: [run_class(t, make) for t in held_out] for label, make in makers.items()}
    results = {label: summarize(r) for label, r in runs.items()}
    pairs = list(zip(runs["DeepMomentum (meta-learned)"], runs["DeepMomentum (hand-set)"]))
    wins = sum(a["mean_loss"] < b["mean_loss"] for a, b in pairs)
    diff = torch.tensor([a["mean_loss"] - b["mean_loss"] for a, b in pairs])
    elapsed = time.perf_counter() - start
    meta = {
        "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s)",
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.meta_memory "
                   + (f"--out {given_out} " if given_out else "--update-results " if args.update_results else "")
                   + f"--threads {args.threads} --meta-steps "
                   f"{args.meta_steps} --meta-lr {args.meta_lr} --tasks-per-step {args.tasks_per_step} --seed {args.seed}",
        "seeds": {"tune_tasks": args.seed + 1, "meta_tasks": args.seed + 2, "held_out_tasks": args.seed + 3},
        "steps": STEPS, "truncation": TRUNCATION, "meta_steps": args.meta_steps, "meta_lr": args.meta_lr,
        "tasks_per_step": args.tasks_per_step,
        "held_out_tasks": HELD_OUT, "tuned_lr": best, "seconds": round(elapsed, 1),
        "learned": {k: (v if not isinstance(v, dict) else {n: t.tolist() for n, t in v.items()})
                    for k, v in learned.items()},
        "wins_learned_vs_handset": f"{wins}/{HELD_OUT}",
        "paired_diff_learned_minus_handset": {"mean": float(diff.mean()),
                                              "sem": float(diff.std() / math.sqrt(len(diff)))},
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results,
                                                       "meta_history": history}, indent=1))
    write_table(args.out, meta, results)
    plot(args.out, results, history)
    print((args.out / "results.md").read_text())
    announce(str(args.out))


def write_table(out: Path, meta: dict, results: dict) -> None:
    lines = ["# Meta-learned DeepMomentum memory on held-out digits tasks", "",
             f"Machine: {meta['machine']} ({meta['platform']}, torch {meta['torch']}), {meta['date']}, "
             f"{meta['seconds']} s in all.  ",
             f"Command: `{meta['command']}`  ",
             f"Seeds: {meta['seeds']}. {meta['held_out_tasks']} held-out tasks ({WAYS}-way, class sets containing 7, 8 or 9; "
             f"meta-training saw only 0-6), {meta['steps']} steps of batch {BATCH}, MLP 64-{HIDDEN}-{WAYS}.  ",
             f"Learning rates tuned on meta-training tasks: {meta['tuned_lr']} (the meta-learned memory uses the "
             "hand-set DeepMomentum's).  ",
             f"Learned: momentum {meta['learned']['momentum']:.4f}, inner_lr {meta['learned']['inner_lr']:.4f} "
             f"(hand-set 0.9, 0.1), plus the memory MLP's initial weights.  ",
             f"Meta-learned beats hand-set DeepMomentum (mean training loss) on {meta['wins_learned_vs_handset']} "
             f"held-out tasks; paired difference (learned - hand-set) "
             f"{meta['paired_diff_learned_minus_handset']['mean']:.4f} ± "
             f"{meta['paired_diff_learned_minus_handset']['sem']:.4f}.", "",
             "| optimizer | mean training loss over the run | final training loss | test accuracy |",
             "|---|---|---|---|"]
    for label, r in sorted(results.items(), key=lambda kv: kv[1]["mean_loss"]["mean"]):
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['sem']:.4f}" for k in ("mean_loss", "final_loss", "test_acc")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard error over held-out tasks. ![curves](meta_memory.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, results: dict, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        a.plot(range(1, STEPS + 1), r["curve"], label=label)
    a.set(xlabel="step", ylabel="training loss (mean over held-out tasks)", yscale="log",
          title="held-out tasks")
    a.legend()
    losses = [h["meta_loss"] for h in history]
    smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    b.plot(losses, alpha=0.3, label="meta-loss")
    b.plot(smooth, label="moving mean (10)")
    b.set(xlabel="outer step", ylabel="mean training loss of the sampled task", title="meta-training")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "meta_memory.png", dpi=110)


if __name__ == "__main__":
    main()
