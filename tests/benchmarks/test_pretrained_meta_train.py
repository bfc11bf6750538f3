"""benchmarks.pretrained: meta-training writes a loadable memory and resumes exactly; the evaluation's report."""

import json
import math
import types

import pytest
import torch

import deepopt
from benchmarks.pretrained import evaluate, meta_train

TINY = ["--meta-steps", "3", "--unroll", "4", "--truncation", "2", "--validation-tasks", "2", "--lr-grid", "0.01",
        "0.1", "--families", "digits_mlp", "--sigmas", "identity", "--checkpoint-every", "1"]


def test_meta_training_writes_a_memory_the_optimizer_loads(tmp_path):
    assert meta_train.main(["--out", str(tmp_path), *TINY]) == 0
    memory = deepopt.pretrained.load(tmp_path / "memory.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    learned = summary["results"][0]["learned"]
    assert summary["chosen"] == "identity" and memory.hyperparameters["lr"] == learned["lr"]
    assert memory.hyperparameters["lr"] != 0.01 or learned["momentum"] != 0.9  # something was learned
    assert "digits_mlp" in memory.card["training_distribution"] and "meta_train" in memory.card["command"]
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    deepopt.DeepMomentum.pretrained([p], name=tmp_path / "memory.json").step()
    assert torch.isfinite(p).all()


def test_fixed_lr_keeps_the_grid_rate_and_validation_steps_set_the_grid_horizon(tmp_path):
    args = [a if a != "identity" else "rms" for a in TINY]
    assert meta_train.main(["--out", str(tmp_path), *args, "--fixed-lr", "--validation-steps", "6"]) == 0
    (result,) = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert result["validation_steps"] == 6 and result["sigma"] == "rms"
    best = min(result["lr_grid"], key=result["lr_grid"].get)
    assert result["learned"]["lr"] == result["start_lr"] == float(best)
    assert result["learned"]["momentum"] != 0.9  # the memory's own values were learned
    card = deepopt.pretrained.load(tmp_path / "memory.json").card
    assert "validation at 6" in card["horizon"] and "rate fixed" in card["horizon"]


def test_preconditioned_memory_and_keep_hand_set(tmp_path, monkeypatch):
    """--precondition meta-trains DeepMomentum(precondition=True); with --keep-hand-set a learned memory
    that does not validate lower gives way to the hand-set one (here: every validation after the grid
    is made worse)."""
    args = ["--out", str(tmp_path), *TINY, "--precondition", "--keep-hand-set", "--fixed-lr"]
    real, calls = meta_train.validation_loss, []

    def worse_after_the_grid(hp, tasks, steps, objective="mean"):
        calls.append(hp)
        return real(hp, tasks, steps, objective) + (1.0 if len(calls) > 2 else 0.0)  # the grid has two rates

    monkeypatch.setattr(meta_train, "validation_loss", worse_after_the_grid)
    assert meta_train.main(args) == 0
    (result,) = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert result["kept"] == "hand-set" and result["validation_loss"] == result["validation_loss_hand_set"]
    assert result["validation_loss_learned"] > result["validation_loss"]
    memory = deepopt.pretrained.load(tmp_path / "memory.json")
    hp = memory.hyperparameters
    assert hp["precondition"] and (hp["momentum"], hp["inner_lr"], hp["lr"]) == (0.9, 0.1, result["start_lr"])
    assert "so the hand-set memory is kept" in memory.card["summary"]
    assert "Adam-preconditioned" in memory.card["summary"]


def test_log_objective_and_whole_unrolls(tmp_path):
    """--objective log validates by the geometric mean of the loss ratio (below 1 on tasks that train),
    and the card says so; --truncation equal to --unroll is said to differentiate the whole run."""
    args = list(TINY)
    args[args.index("--truncation") + 1] = "4"
    assert meta_train.main(["--out", str(tmp_path), *args, "--objective", "log"]) == 0
    (result,) = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert 0 < result["validation_loss"] < 1 and all(math.isfinite(v) for v in result["lr_grid"].values())
    assert all(h["meta_loss"] < 0 for h in result["history"])  # the mean of log ratios below 1
    card = deepopt.pretrained.load(tmp_path / "memory.json").card
    assert "the log of each task's training loss" in card["meta_objective"]
    assert "differentiated whole (no truncation)" in card["meta_objective"]


def test_factored_unnormalized_memory(tmp_path):
    """--precondition factored --no-normalize meta-trains DeepMomentum(precondition="factored",
    normalize=False) and the memory file carries both."""
    assert meta_train.main(["--out", str(tmp_path), *TINY, "--precondition", "factored", "--no-normalize"]) == 0
    memory = deepopt.pretrained.load(tmp_path / "memory.json")
    assert (memory.hyperparameters["precondition"], memory.hyperparameters["normalize"]) == ("factored", False)
    assert "factored second moment, not normalized" in memory.card["summary"]
    opt = deepopt.DeepMomentum.pretrained([torch.nn.Parameter(torch.ones(3, 2))], name=tmp_path / "memory.json")
    assert type(opt.chains[0].levels[0]).__name__ == "FactoredPreconditioner"


def test_cut_short_meta_training_resumes_to_the_same_memory(tmp_path, monkeypatch):
    assert meta_train.main(["--out", str(tmp_path / "whole"), *TINY]) == 0
    clock = iter(range(1000))  # each read of the clock one second later: the deadline passes after two steps
    monkeypatch.setattr(meta_train, "time", types.SimpleNamespace(time=lambda: next(clock),
                                                                   perf_counter=meta_train.time.perf_counter))
    cut = tmp_path / "cut"
    assert meta_train.main(["--out", str(cut), *TINY, "--max-seconds", "2.5"]) == meta_train.EXIT_UNFINISHED
    assert len(torch.load(cut / "identity" / "checkpoint.pt", weights_only=True)["history"]) == 2
    monkeypatch.undo()
    assert meta_train.main(["--out", str(cut), *TINY]) == 0
    whole, resumed = (json.loads((d / "summary.json").read_text())["results"][0] for d in (tmp_path / "whole", cut))
    assert resumed["learned"] == whole["learned"]
    assert [h["meta_loss"] for h in resumed["history"]] == [h["meta_loss"] for h in whole["history"]]


def test_evaluation_scores_and_report(tmp_path):
    meta_train.main(["--out", str(tmp_path / "meta"), *TINY])
    families = evaluate.main(["--memory", str(tmp_path / "meta" / "memory.json"), "--out", str(tmp_path / "eval"),
                              "--families", "digits_autoencoder", "--seeds", "2", "--steps", "3", "--long", "2",
                              "--lr-grid", "1e-3", "1e-2", "1e-1"])
    (f,) = families
    assert f["grids"]["adamw"]["best"] in (1e-3, 1e-2, 1e-1) and len(f["runs"]["pretrained"]) == 2
    assert f["grids"]["adamw"]["0.001"] == f["summary"]["adamw_default"]["mean"]  # the grid's 1e-3 runs
    assert math.isfinite(f["summary"]["pretrained"]["mean"]) and f["long"]["steps"] == 6
    assert set(f["long"]["runs"]) == {"pretrained", "adamw_default"} and len(f["long"]["runs"]["pretrained"]) == 2
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "| digits_autoencoder | 3 |" in text and "Both (target: >= 4 of 5)" in text
    # --first-seed: fresh task instances of the same family (seed 1 is the second task above)
    (g,) = evaluate.main(["--memory", str(tmp_path / "meta" / "memory.json"), "--out", str(tmp_path / "eval1"),
                          "--families", "digits_autoencoder", "--seeds", "1", "--first-seed", "1", "--steps", "3",
                          "--long", "2", "--lr-grid", "1e-3"])
    assert g["runs"]["pretrained"] == f["runs"]["pretrained"][1:]
    assert "Seeds: 1 (from seed 1)" in (tmp_path / "eval1" / "results.md").read_text()


def test_families_in_worker_processes_give_the_same_results(tmp_path):
    args = ["--families", "digits_autoencoder", "mnist1d_mlp", "--seeds", "1", "--steps", "3", "--long", "2",
            "--lr-grid", "1e-3", "1e-2"]
    one = evaluate.main([*args, "--out", str(tmp_path / "one")])
    two = evaluate.main([*args, "--out", str(tmp_path / "two"), "--workers", "2"])
    assert [f["family"] for f in two] == ["digits_autoencoder", "mnist1d_mlp"]
    means = [{k: s["mean"] for k, s in f["summary"].items()} for f in one]
    assert [{k: s["mean"] for k, s in f["summary"].items()} for f in two] == means
    with pytest.raises(SystemExit):
        evaluate.main([*args, "--out", str(tmp_path / "bad"), "--workers", "0"])


def test_a_diverging_run_scores_inf():
    class Exploding:
        params = {"w": torch.ones(2)}
        steps = 3

        def loss(self, params, step):
            return (params["w"] * 1e30).square().sum() * 1e30

        def eval_loss(self, params):
            return float(params["w"].sum())

        def parameters(self):
            return [torch.nn.Parameter(self.params["w"].clone())]

        def named(self, tensors):
            return {"w": tensors[0]}

    run = evaluate.train(Exploding(), lambda p: torch.optim.SGD(p, lr=1.0))
    assert run["final"] == math.inf and run["initial"] == 2.0 and evaluate.diverged(run)


def test_divergence_reads_the_training_loss_not_the_held_out_one():
    run = {"initial_train": 2.0, "final_train": 0.5, "initial": 2.0, "final": 4.0}  # overfitting, not divergence
    assert not evaluate.diverged(run)
    assert evaluate.diverged({**run, "final_train": 2.5}) and evaluate.diverged({**run, "final_train": math.inf})


def test_a_sign_read_out_meta_trains_its_memory_through_the_straight_through_estimator(tmp_path):
    args = [a if a != "identity" else "sign" for a in TINY]
    assert meta_train.main(["--out", str(tmp_path), *args]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    learned = summary["results"][0]["learned"]
    start = deepopt.levels.deep.default_memory_init(8)
    assert summary["chosen"] == "sign" and learned["sigma"] == "sign"
    assert learned["memory_init"]["w1"] != start["w1"].tolist()  # a meta-gradient reached the memory
    assert learned["momentum"] != 0.9 and learned["inner_lr"] != 0.1


@pytest.mark.parametrize("bad", [["--sigmas", "adam"], ["--families", "no_such_family"]])
def test_meta_training_refuses_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit):
        meta_train.main(["--out", str(tmp_path), *bad])


def test_two_processes_average_their_meta_gradients(tmp_path):
    """Two gloo processes (the torchrun environment), each on its own tasks: both finish, rank 0 writes,
    and the memory differs from one process's (the other rank's tasks count)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "benchmarks.pretrained.meta_train", "--out", str(tmp_path / "two"), *TINY]
    procs = [subprocess.Popen(argv, env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert meta_train.main(["--out", str(tmp_path / "one"), *TINY]) == 0
    two, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    assert two["meta"]["world"] == 2 and two["results"][0]["learned"] != one["results"][0]["learned"]


@pytest.mark.gpu
def test_meta_training_and_evaluation_run_on_cuda(tmp_path):
    """The GPU paths: tasks, the learner and the functional optimizer on CUDA; the evaluation's runs there too."""
    assert meta_train.main(["--out", str(tmp_path / "meta"), *TINY, "--device", "cuda"]) == 0
    families = evaluate.main(["--memory", str(tmp_path / "meta" / "memory.json"), "--out", str(tmp_path / "eval"),
                              "--families", "digits_autoencoder", "shakespeare_gru", "--seeds", "1", "--steps", "3",
                              "--long", "2", "--lr-grid", "1e-3", "1e-2", "--device", "cuda"])
    assert all(math.isfinite(f["summary"]["pretrained"]["mean"]) for f in families)
    machine = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]["machine"]
    assert machine == torch.cuda.get_device_name()  # the card the record names
