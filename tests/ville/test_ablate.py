"""`python -m ville.ablate`: which trainings each row needs, how seeds enter, the table's statistics, and a real
two-row run on a small benchmark that a second invocation continues without retraining or re-evaluating."""
from __future__ import annotations

import json
import os
import signal

import pytest
from omegaconf import OmegaConf

from ville import ablate as A
from ville.config import apply_overrides, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ancestry(name):
    chain = []
    while name:
        chain.append(A.NODES[name])
        name = A.NODES[name].parent
    return chain[::-1]


def test_rows_train_what_their_names_say():
    for row in A.ROWS:
        assert row.node in A.NODES, row
    stages = {row.name: [n.stage for n in _ancestry(row.node)] for row in A.ROWS}
    assert stages["G+C+M"] == [1, 2, 3] and stages["G+C"] == [1] and stages["C"] == [1] and stages["G"] == [1]
    assert stages["without stage 1"] == [2, 3] and stages["without stage 2"] == [1, 3]
    assert [n.name for n in _ancestry("gcm3")][:1] == ["gc1"]  # G+C+M continues G+C, not another stage 1
    # C trains no LM term and no batch only the LM would use; G trains no contrastive-type term.
    c = load_recipe("recipes/tiny/stage1.yaml", list(A.NODES["c1"].overrides))
    assert c.loss.lm == 0 and c.loss.contrastive > 0 and set(c.train.tasks) <= {"caption", "retrieval"}
    g = load_recipe("recipes/tiny/stage1.yaml", list(A.NODES["g1"].overrides))
    assert g.loss.contrastive == 0 and g.loss.swap == 0 and g.loss.lm > 0
    assert A.NODES["gcm3-no-matching"].overrides == ("loss.matching=0",)
    for name in ("C", "G+C", "G+C+M", "fixed 1", "fixed 5", "fixed 10"):
        assert len(next(r for r in A.ROWS if r.name == name).seeds) == 3, name


def test_train_node_chains_parents_and_seeds(monkeypatch, tmp_path):
    calls = []

    def fake_stage(stage, data, runs, extra):
        calls.append((stage, runs, extra))
        return os.path.join(runs, f"stage{stage}", "final")

    monkeypatch.setattr(A.demo, "train_stage", fake_stage)
    final = A.train_node("gcm3", 2, "data", str(tmp_path), ["train.max_steps=3"])
    assert [c[0] for c in calls] == [1, 2, 3]
    assert final == os.path.join(str(tmp_path), "seed2", "gcm3", "stage3", "final")
    for (stage, runs, extra), parent in zip(calls, (None, calls[0], calls[1])):
        want = "null" if parent is None else os.path.join(parent[1], f"stage{parent[0]}", "final")
        assert f"train.init_from={want}" in extra
        assert f"train.seed={stage + 200}" in extra and f"data.seed={stage + 200}" in extra
        assert extra[-1] == "train.max_steps=3"
    # demo.train_stage puts its own init_from first; a later dotted override wins.
    merged = apply_overrides("x.yaml", OmegaConf.create({"train": {"init_from": None}}),
                             ["train.init_from=a", "train.init_from=b"])
    assert merged.train.init_from == "b"
    calls.clear()
    A.train_node("gc1", 0, "data", str(tmp_path), [])
    assert not any("seed=" in o for o in calls[0][2])  # seed 0 keeps the recipes' (the demo's) seeds


def test_steps_scale_every_schedule_and_an_override_still_wins():
    """--steps f: each stage's max_steps, warmup and checkpoint interval at f times its recipe's, rounded; 1 is the
    recipes' own schedule (no override); a caller's later override wins over the scaled one."""
    for stage in (1, 2, 3):
        raw = load_recipe(f"recipes/tiny/stage{stage}.yaml")
        assert A.schedule_overrides(stage, 1.0) == []
        got = load_recipe(f"recipes/tiny/stage{stage}.yaml", A.schedule_overrides(stage, 0.5))
        assert got.train.max_steps == round(raw.train.max_steps * 0.5)
        assert got.optim.warmup_steps == round(raw.optim.warmup_steps * 0.5)
        assert got.train.save_every == round(raw.train.save_every * 0.5)
        assert got.optim.lr == raw.optim.lr and got.train.tasks == raw.train.tasks  # nothing else moves
    assert load_recipe("recipes/tiny/stage1.yaml", A.schedule_overrides(1, 0.001)).train.max_steps == 1
    args, final = A.node_args("gcm3", 1, "data", "runs", ["train.max_steps=2"], steps=(1, 1, 0.5))
    stage3 = load_recipe(args[0], args[1:])
    assert stage3.train.max_steps == 2 and stage3.train.seed == 103
    # one fraction per stage: each node takes its own stage's
    args = A.node_args("gcm3", 0, "data", "runs", [], steps=(0.75, 1, 0.5))[0]
    assert load_recipe(args[0], args[1:]).train.max_steps == 85
    args = A.node_args("gc1", 0, "data", "runs", [], steps=(0.75, 1, 0.5))[0]
    assert load_recipe(args[0], args[1:]).train.max_steps == 750
    assert stage3.train.init_from == os.path.join("runs", "seed1", "gc2", "stage2", "final")
    assert A.STEPS == (1, 1, 1)  # the demo's schedules unless asked


class _FakeTraining:
    """A training that finishes after `steps` polls with `rc`, recording the scheduler's view."""

    def __init__(self, t, log, steps, rc=0):
        self.t, self.steps, self.rc, self.log, self.signals = t, steps, rc, log, []

    def poll(self):
        self.steps -= 1
        if self.steps <= 0:
            self.log["finished"].append(self.t)
            self.log["running"].discard(self.t)
            return self.rc
        return None

    def send_signal(self, sig):
        self.signals.append(sig)

    def wait(self):
        return self.rc


def _fake_start(log, steps=None, rc=None, trained=()):
    def start(name, seed):
        t = (name, seed)
        parent = A.NODES[name].parent
        assert parent is None or (parent, seed) in log["finished"] or (parent, seed) in trained, t  # parent first
        log["started"].append(t)
        if t in trained:
            log["finished"].append(t)
            return None
        log["running"].add(t)
        log["peak"] = max(log["peak"], len(log["running"]))
        log["procs"][t] = _FakeTraining(t, log, (steps or {}).get(t, 2), (rc or {}).get(t, 0))
        return log["procs"][t]
    return start


def _log():
    return {"started": [], "finished": [], "running": set(), "peak": 0, "procs": {}}


def test_trainings_run_parents_first_at_most_jobs_at_once():
    todo = A.trainings([r for r in A.ROWS if r.name in ("C", "G+C+M", "without stage 2")], None)
    assert todo[:3] == [("c1", 0), ("c1", 1), ("c1", 2)] and len(todo) == len(set(todo)) == 13
    assert todo.index(("gc1", 0)) < todo.index(("gc2", 0)) < todo.index(("gcm3", 0))
    assert A.trainings([A.ROWS[0]], 1) == [("c1", 0)]  # --seeds 1
    log = _log()
    A.run_trainings(todo, 2, _fake_start(log), poll_s=0)
    assert sorted(log["finished"]) == sorted(todo) and log["peak"] == 2
    # the longest chains start first: the three gc1 -> gc2 -> gcm3 chains before the c1 and no2-3 leaves
    assert log["started"][:3] == [("gc1", 0), ("gc1", 1), ("gc1", 2)]
    log = _log()
    A.run_trainings(todo, 1, _fake_start(log, trained={("gc1", 0), ("gc2", 0)}), poll_s=0)
    assert sorted(log["finished"]) == sorted(todo) and log["peak"] == 1


def test_a_failed_training_stops_new_ones_and_names_its_log():
    todo = A.trainings([r for r in A.ROWS if r.name in ("G+C+M", "C")], 1)  # gc1, gc2, gcm3, c1
    log = _log()
    start = _fake_start(log, steps={("gc1", 0): 1, ("c1", 0): 5}, rc={("gc1", 0): 3})
    with pytest.raises(SystemExit, match=r"^\[ablate\] training gc1 \(seed 0\) failed with exit code 3; its log: "):
        A.run_trainings(todo, 2, start, poll_s=0)
    assert log["started"] == [("gc1", 0), ("c1", 0)] and ("c1", 0) in log["finished"]  # c1 ran to its end
    log = _log()

    def interrupted(name, seed):
        if log["started"]:
            raise KeyboardInterrupt
        return _fake_start(log, steps={("gc1", 0): 10})(name, seed)
    with pytest.raises(KeyboardInterrupt):
        A.run_trainings(todo, 2, interrupted, poll_s=0)
    assert log["procs"][("gc1", 0)].signals == [signal.SIGTERM]  # the running training checkpoints and stops


def test_summary_and_table():
    results = {"C": {0: {"T2V R@1": 10.0, "V2T R@1": 8.0}, 1: {"T2V R@1": 14.0, "V2T R@1": 9.0},
                     2: {"T2V R@1": 12.0, "V2T R@1": 7.0}},
               "G": {0: {"T2V R@1": 1.5, "V2T R@1": None}}}
    s = A.summarise(results)
    assert s["C"]["T2V R@1"] == {"mean": 12.0, "min": 10.0, "max": 14.0, "n": 3}
    assert "V2T R@1" not in s["G"]
    table = A.markdown(s).splitlines()
    assert table[2].startswith("| C | 3 | 12.00 (10.00..14.00) | 8.00 (7.00..9.00) | - |")
    assert table[3].startswith("| G | 1 | 1.50 | - |")


def test_unknown_row_is_one_line(capsys):
    assert A.main(["--rows", "G+C", "H"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown row(s) ['H']" in err[0]


@pytest.mark.usefixtures("one_thread")
def test_two_rows_run_and_a_rerun_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # recipes/tiny/*.yaml are read relative to the repository, as `make ablate` runs it
    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    argv = ["--data", data, "--runs", runs, "--rows", "G+C", "fixed 1", "--seeds", "1", "--eval-clips", "6",
            "--num-train", "48", "--num-val", "0", "--num-test", "6", "--num-compositional", "0",
            "--num-composed", "0", "--jobs", "1", "--train-overrides", "train.max_steps=2", "train.save_every=1",
            "data.num_workers=0"]
    assert A.main(argv) == 0  # --jobs 1: trained in this process (a subprocess imports torch & co. for ~15 s)
    out = json.load(open(os.path.join(runs, "ablation.json")))
    assert set(out["seeds"]) == {"G+C", "fixed 1"}
    assert out["seeds"]["fixed 1"]["0"]["mean tokens"] == 1.0  # every video embedded with exactly one token
    # The lengths timed side by side on the G+C+M model: every length measured, the fixed row's number is its own.
    paired = json.load(open(os.path.join(runs, "eval", "embed-ms-seed0.json")))
    assert set(paired["median"]) == set(A.LENGTHS) and paired["clips"] == 6
    assert all(len(v) == 9 and min(v) > 0 for v in paired["all"].values())
    assert out["seeds"]["fixed 1"]["0"]["embed ms / video"] == paired["median"]["fixed 1"]
    assert "embed ms / video" not in out["seeds"]["G+C"]["0"]
    assert 0 <= out["seeds"]["G+C"]["0"]["binding T2V"] <= 100  # the binding pairs were generated and scored
    for name in ("ablation.md", "ablation.png"):
        assert os.path.getsize(os.path.join(runs, name)) > 0
    capsys.readouterr()
    argv[argv.index("--jobs") + 1] = "2"
    assert A.main(argv) == 0
    log = capsys.readouterr().out
    assert "exists, not retraining" in log and "[ablate] training" not in log and "[demo] training" not in log
    assert json.load(open(os.path.join(runs, "ablation.json")))["seeds"] == out["seeds"]
    # --jobs 2 trains in subprocesses (here one: C's stage 1), each logged beside its run folder.
    argv[argv.index("--rows") + 1: argv.index("--seeds")] = ["C"]
    assert A.main(argv) == 0
    assert "[ablate] training c1 (seed 0, 1 thread(s)" in capsys.readouterr().out
    assert "final model:" in open(os.path.join(runs, "seed0", "c1", "stage1.log")).read()
    assert set(json.load(open(os.path.join(runs, "ablation.json")))["seeds"]) == {"C"}
    # These trainings ran at the default --steps: the same folder at another length is refused, in one line.
    assert json.load(open(os.path.join(runs, "schedule.json"))) == {"steps": [1, 1, 1]}
    capsys.readouterr()
    assert A.main([*argv, "--steps", "1", "1", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds trainings at --steps 1 1 1; pass --steps 1 1 1" in err[0], err
    for bad in (["0"], ["0.5", "0.5"], ["1.5"]):
        assert A.main([*argv, "--steps", *bad]) == 2
        assert "error: --steps: expected one fraction" in capsys.readouterr().err
