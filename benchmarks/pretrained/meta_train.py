"""Meta-train DeepMomentum's memory over the meta-training task families, and write it as a memory file.

For each read-out ``sigma`` in ``--sigmas`` (``identity``, ``rms``, ``ns``; ``sign``, whose own gradient is
zero, meta-trains through the straight-through estimator, ``deepopt.levels.deep.straight_through_sign``):

1. the starting learning rate: the hand-set DeepMomentum (momentum 0.9, inner_lr 0.1) at each rate of
   ``--lr-grid`` on ``--validation-tasks`` fresh meta-family tasks (``--validation-steps`` inner steps,
   by default the longest unroll); the best (lowest validation loss);
2. meta-learning of the memory's initial MLP (``memory_init``), ``inner_lr``, ``momentum`` and ``lr``
   (``--fixed-lr``: the rate stays at the grid's best)
   by truncated unrolls (:class:`deepopt.meta.MetaTrainer`: ``--unroll`` inner steps in segments of
   ``--truncation``, ``--tasks-per-step`` tasks per outer step; with ``--unroll-max`` each outer
   step's horizon is drawn from [unroll, unroll_max]; the memory lives in the optimizer state, which
   is detached between segments, so only ``--truncation`` equal to ``--unroll`` teaches
   ``memory_init`` from the whole run, not its first segment), each task's loss divided by its initial
   loss, so that every family weighs the same whatever its loss scale:

       meta-loss = mean over tasks and steps t of  L_task(W_t) / L_task(W_0);

   (``--objective log``: of ``log(L_task(W_t) / L_task(W_0))``, so a task counts by its relative progress
   (halving a loss near zero weighs as much as halving a large one), as the held-out comparison
   (final loss over AdamW's) does; the validation then reports the geometric mean of the ratio);

3. validation of the learned values on the same validation tasks (the same normalized loss over the
   run, no gradient); with ``--keep-hand-set`` a learned memory that validates worse than the hand-set
   one at the grid's best rate is dropped for that hand-set memory (the result says which was kept).

``--precondition`` meta-trains ``DeepMomentum(precondition=True)``, whose memory reads Adam's
preconditioned gradient (``--precondition factored``: Adafactor's factored second moment;
``--no-normalize``: the memory reads its input not divided by its RMS). The read-out with the lowest validation loss is the memory: ``OUT/memory.json`` (the format of
:mod:`deepopt.pretrained`; ``--ship NAME`` also writes ``deepopt/pretrained/NAME.json``), beside
``OUT/summary.json`` (every read-out's starting rate, learned values, validation loss, history).

Resumable: each read-out checkpoints into ``OUT/<sigma>/checkpoint.pt`` every ``--checkpoint-every``
outer steps and when ``--max-seconds`` runs out (then the process exits with code 3: run the same
command again to continue); a finished read-out is not run again. Several processes (``torchrun
--nproc-per-node N -m benchmarks.pretrained.meta_train ...``, with ``--device cuda`` one GPU each, or
shared when N exceeds the GPUs: the small tasks are launch-bound, so several processes fill one GPU;
they then all-reduce through gloo): each samples its own tasks (task seed + rank) and the
meta-gradients are averaged by an all-reduce before every step, so all processes hold the same
memory; rank 0 writes.

Example (CPU, seconds; a check, not a result):
    python -m benchmarks.pretrained.meta_train --out /tmp/meta --meta-steps 2 --unroll 4 --truncation 2 \\
        --validation-tasks 2 --lr-grid 0.01 0.1 --families digits_mlp --sigmas identity
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from deepopt import functional as F
from deepopt.levels.deep import SIGMAS, default_memory_init, straight_through_sign
from deepopt.meta import MetaLearner, MetaTrainer, unroll

from .families import FAMILIES, META_FAMILIES

#: what the meta-training learns of DeepMomentum
LEARN = ("memory_init", "inner_lr", "momentum", "lr")
HAND_SET = dict(momentum=0.9, inner_lr=0.1)
EXIT_UNFINISHED = 3


class Normalized:
    """A task whose loss is divided by its loss at the initial parameters (step 0's batch)."""

    def __init__(self, task: Any) -> None:
        self.task, self.params = task, task.params
        with torch.no_grad():
            self.scale = 1.0 / max(float(task.loss(task.params, 0)), 1e-8)

    def loss(self, params, step: int) -> torch.Tensor:
        return self.task.loss(params, step) * self.scale


class Sampler:
    """``sampler(generator)``: a family drawn uniformly, then one of its tasks at ``steps`` inner steps
    (an attribute: the driver sets it before each outer step when horizons are random)."""

    def __init__(self, families: Sequence[str], steps: int, device: str) -> None:
        self.families, self.steps, self.device = list(families), steps, device

    def __call__(self, g: torch.Generator) -> Normalized:
        family = FAMILIES[self.families[int(torch.randint(len(self.families), (1,), generator=g))]]
        return Normalized(family.sample(g, steps=self.steps, device=self.device))


def horizon(args: argparse.Namespace, step: int) -> int:
    """The inner steps of outer step ``step``: ``--unroll``, or with ``--unroll-max`` a multiple of
    ``--truncation`` drawn uniformly from [unroll, unroll_max] (a function of the seed and the step, so
    a resumed run draws the same ones)."""
    if not args.unroll_max or args.unroll_max <= args.unroll:
        return args.unroll
    choices = range(args.unroll, args.unroll_max + 1, args.truncation)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


def validation_loss(hyperparameters: dict, tasks: Sequence[Normalized], steps: int, objective: str = "mean") -> float:
    """Mean normalized loss over ``steps`` inner steps of DeepMomentum with ``hyperparameters``, over
    ``tasks`` (inf if any run leaves the finite numbers); for ``objective="log"`` the geometric mean
    (``exp`` of the mean log: the same order as the meta-objective, on the ratio's scale)."""
    total = 0.0
    for task in tasks:
        with torch.no_grad():  # torch.func.grad inside still differentiates the inner loss
            loss = float(unroll(F.make("DeepMomentum", **hyperparameters), task, steps, objective=objective)[0])
        if not math.isfinite(loss):
            return math.inf
        total += loss / len(tasks)
    return math.exp(total) if objective == "log" else total


def all_reduce_mean(grads: list[torch.Tensor]) -> None:
    """Average ``grads`` in place over the default process group (one flat all-reduce; through the
    host under gloo, the backend of processes that share a GPU)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    host = flat.is_cuda and dist.get_backend() == "gloo"
    summed = flat.cpu() if host else flat
    dist.all_reduce(summed)
    flat = summed.to(flat.device) if host else summed
    flat /= dist.get_world_size()
    parts = flat.split([g.numel() for g in grads])
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])


def out_of_time(deadline: float, world: int, device: str) -> bool:
    """Whether ``deadline`` has passed, by rank 0's clock on every rank (ranks that decided apart
    would leave the others waiting in the next all-reduce)."""
    late = time.time() > deadline
    if world == 1:
        return late
    flag = torch.tensor([float(late)], device="cpu" if dist.get_backend() == "gloo" else device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _plain(hp: dict) -> dict:
    return {k: ({n: t.tolist() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in hp.items()}


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def structure(args: argparse.Namespace) -> dict[str, Any]:
    """The memory's fixed structure from the command line: its preconditioner and normalization."""
    out: dict[str, Any] = {}
    if args.precondition:
        out["precondition"] = True if args.precondition == "diagonal" else args.precondition
    if args.no_normalize:
        out["normalize"] = False
    return out


def _over(args: argparse.Namespace) -> str:
    """The card's words for the memory's input."""
    pre = {"diagonal": ", over Adam-preconditioned gradients",
           "factored": ", over gradients preconditioned by Adafactor's factored second moment"}
    return pre.get(args.precondition or "", "") + (", not normalized" if args.no_normalize else "")


def train_sigma(sigma: str, args: argparse.Namespace, rank: int, world: int, deadline: float) -> dict | None:
    """One read-out's lr choice, meta-training and validation; ``None`` if ``deadline`` came first
    (the checkpoint holds the progress)."""
    folder = args.out / sigma
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    vg = torch.Generator().manual_seed(args.seed + 1000)
    val_steps = args.validation_steps or max(args.unroll, args.unroll_max or 0)
    sample = Sampler(args.families, val_steps, args.device)
    val_tasks = [sample(vg) for _ in range(args.validation_tasks)]
    fixed = dict(HAND_SET, sigma=sigma, hidden=args.hidden, **structure(args))
    ckpt_path = folder / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu") if ckpt_path.exists() else None
    if ckpt is None:
        grid = {lr: validation_loss(dict(fixed, lr=lr), val_tasks, val_steps, args.objective) for lr in args.lr_grid}
        start_lr = min(grid, key=grid.get)
        history, used = [], 0.0
    else:
        grid, start_lr, history, used = ckpt["grid"], ckpt["start_lr"], ckpt["history"], ckpt["seconds"]
    learn = tuple(k for k in LEARN if not (args.fixed_lr and k == "lr"))
    learner = MetaLearner("DeepMomentum", learn=learn, lr=start_lr, **fixed).to(args.device)
    trainer = MetaTrainer(learner, sample, unroll=args.unroll, truncation=args.truncation, meta_lr=args.meta_lr,
                          clip=1.0, tasks_per_step=args.tasks_per_step, seed=args.seed + rank,
                          sync=all_reduce_mean if world > 1 else None, objective=args.objective)
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])  # rank 0's generator: its task stream continues exactly
        if rank > 0:  # the others' streams were not saved: fresh ones, distinct per rank and resumption
            trainer.generator.manual_seed(args.seed + rank + 7919 * len(history))
    t0 = time.perf_counter()

    def checkpoint() -> None:
        if rank == 0:
            _save_atomic({"trainer": trainer.state_dict(), "grid": grid, "start_lr": start_lr, "history": history,
                          "seconds": used + time.perf_counter() - t0}, ckpt_path)

    while len(history) < args.meta_steps:
        if out_of_time(deadline, world, args.device):
            checkpoint()
            return None
        sample.steps = trainer.unroll = horizon(args, len(history))
        with straight_through_sign() if sigma == "sign" else contextlib.nullcontext():
            stats = trainer.step()
        history.append({k: float(v) for k, v in stats.items()} | {"unroll": trainer.unroll})
        i = len(history)
        if rank == 0 and (i % 10 == 1 or i == args.meta_steps):
            print(f"[{sigma}] outer step {i}/{args.meta_steps}  meta-loss {stats['meta_loss']:.4f}  "
                  f"|grad| {stats['grad_norm']:.3f}", flush=True)
        if i % args.checkpoint_every == 0:
            checkpoint()
    learned = learner.learned()
    learned_loss = loss = validation_loss(learned, val_tasks, val_steps, args.objective)
    kept = "learned"
    if args.keep_hand_set and not loss < grid[start_lr]:  # meta-training did not help: the hand-set memory
        hand = dict(fixed, lr=start_lr, memory_init=default_memory_init(args.hidden))  # what the grid ran
        learned, loss, kept = hand, grid[start_lr], "hand-set"
    result = {"sigma": sigma, "lr_grid": {str(k): v for k, v in grid.items()}, "start_lr": start_lr,
              "validation_loss_hand_set": grid[start_lr], "validation_loss_learned": learned_loss,
              "validation_loss": loss, "kept": kept, "validation_steps": val_steps,
              "learned": _plain(learned), "history": history,
              "skipped_steps": sum(h["skipped"] for h in history),
              "seconds": round(used + time.perf_counter() - t0, 1)}
    if rank == 0:
        done.write_text(json.dumps(result, indent=1))
    return result


def _card(args: argparse.Namespace, best: dict, results: list[dict], world: int, command: str) -> dict:
    families = "; ".join(f"{n}: {FAMILIES[n].description}" for n in args.families)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    return {
        "summary": (f"DeepMomentum memory (read-out {best['sigma']}"
                    + _over(args) + ") "
                    + (f"meta-learned over {len(args.families)} task families; validation loss "
                       f"{best['validation_loss']:.4f} of the initial loss against "
                       f"{best['validation_loss_hand_set']:.4f} for the hand-set memory at its best grid rate"
                       if best.get("kept", "learned") == "learned" else
                       f"hand-set (momentum 0.9, inner rate 0.1, the silent initial MLP) at the rate chosen on "
                       f"{len(args.families)} meta-training task families: meta-training from it validated at "
                       f"{best['validation_loss_learned']:.4f} of the initial loss, not below the hand-set "
                       f"memory's {best['validation_loss_hand_set']:.4f}, so the hand-set memory is kept")),
        "training_distribution": families,
        "meta_objective": ("mean over the run of each task's training loss divided by its initial loss, "
                           if args.objective == "mean" else
                           "mean over the run of the log of each task's training loss divided by its initial loss "
                           "(validation: its geometric mean), ")
                          + (f"truncated unrolls of {args.truncation} steps, " if args.truncation < args.unroll else
                             "each unroll differentiated whole (no truncation), ")
                          + f"{args.tasks_per_step} tasks per outer step per process, Adam (meta lr {args.meta_lr}), "
                            "meta-gradient norm clipped at 1",
        "horizon": (f"{args.unroll} inner steps per task" if not args.unroll_max or args.unroll_max <= args.unroll else
                    f"{args.unroll}-{args.unroll_max} inner steps per task (uniform, multiples of {args.truncation})")
                   + f"; rate grid and validation at {best['validation_steps']}"
                   + ("; the rate fixed at the grid's best" if args.fixed_lr else ""),
        "compute": f"{world} process(es) on {device}, torch {torch.__version__}, "
                   f"{sum(r['seconds'] for r in results):.0f} s over read-outs "
                   f"{', '.join(r['sigma'] for r in results)}; {args.meta_steps} outer steps each",
        "command": command,
        "evaluation": args.evaluation,
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output (and checkpoint) folder; rerun to resume")
    ap.add_argument("--families", nargs="+", default=[f.name for f in META_FAMILIES], choices=sorted(FAMILIES))
    ap.add_argument("--sigmas", nargs="+", default=["identity", "ns"], choices=list(SIGMAS))
    ap.add_argument("--meta-steps", type=int, default=200)
    ap.add_argument("--tasks-per-step", type=int, default=2)
    ap.add_argument("--unroll", type=int, default=40)
    ap.add_argument("--unroll-max", type=int, default=None,
                    help="random horizons: each outer step's unroll drawn from [--unroll, this] (validation at this)")
    ap.add_argument("--truncation", type=int, default=10)
    ap.add_argument("--meta-lr", type=float, default=0.03)
    ap.add_argument("--objective", choices=["mean", "log"], default="mean",
                    help="the meta-loss: the mean normalized loss over the run, or the mean of its log")
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--lr-grid", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--validation-tasks", type=int, default=8)
    ap.add_argument("--validation-steps", type=int, default=None,
                    help="inner steps of the rate grid and the validation (default: the longest unroll)")
    ap.add_argument("--fixed-lr", action="store_true",
                    help="keep the grid's best rate: learn the memory, momentum and inner rate only")
    ap.add_argument("--precondition", nargs="?", const="diagonal", choices=["diagonal", "factored"],
                    help="meta-train a preconditioned memory: DeepMomentum(precondition=True) (diagonal, the "
                         "default: Adam's second moment) or precondition='factored' (Adafactor's)")
    ap.add_argument("--no-normalize", action="store_true",
                    help="DeepMomentum(normalize=False): the memory reads its input not divided by its RMS")
    ap.add_argument("--keep-hand-set", action="store_true",
                    help="keep the hand-set memory where the learned one does not validate lower")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=None, help="checkpoint and exit (code 3) after this")
    ap.add_argument("--ship", metavar="NAME", help="also write deepopt/pretrained/NAME.json")
    ap.add_argument("--evaluation", default="not evaluated yet: python -m benchmarks run --suite pretrained",
                    help="the card's evaluation line")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        cuda = args.device.startswith("cuda")
        # more processes than GPUs: they share the GPUs (small tasks are launch-bound), and NCCL takes one
        # process per GPU, so they talk through gloo
        shared = cuda and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world))
        dist.init_process_group("nccl" if cuda and not shared else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
            torch.cuda.set_device(args.device)
    deadline = math.inf if args.max_seconds is None else time.time() + args.max_seconds
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.pretrained.meta_train " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = []
    for sigma in args.sigmas:
        result = train_sigma(sigma, args, rank, world, deadline)
        if result is None:
            if rank == 0:
                print(f"[{sigma}] out of time: checkpointed in {args.out / sigma}; run again to continue", flush=True)
            return EXIT_UNFINISHED
        results.append(result)
        if rank == 0:
            print(f"[{sigma}] validation loss {result['validation_loss']:.4f} (hand-set at lr {result['start_lr']}: "
                  f"{result['validation_loss_hand_set']:.4f})", flush=True)
    if rank == 0:
        from deepopt import pretrained

        best = min(results, key=lambda r: r["validation_loss"])
        learned = dict(best["learned"])
        learned["memory_init"] = {k: torch.tensor(v) for k, v in learned["memory_init"].items()}
        card = _card(args, best, results, world, command)
        meta = {"platform": platform.platform(), "torch": torch.__version__, "world": world,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        (args.out / "summary.json").write_text(json.dumps({"meta": meta, "chosen": best["sigma"],
                                                           "results": results}, indent=1))
        pretrained.save(args.out / "memory.json", learned, name=args.ship or "memory", card=card)
        if args.ship:
            path = Path(pretrained.__file__).parent / f"{args.ship}.json"
            pretrained.save(path, learned, name=args.ship, card=card)
            print(f"shipped: {path}")
        print(f"chosen read-out {best['sigma']}: {json.dumps(best['learned'])}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
