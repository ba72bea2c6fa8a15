"""The paper's ablations in miniature (`make ablate`): each row a real training run of the tiny recipes on the demo's
synthetic benchmark, the same data for every row, evaluated on the test split.

Rows (ViLL-E's Table 5 / 6 in miniature; ../shared/PAPER.md):
    C                       stage 1 with the contrastive losses only (`loss.lm=0`, caption batches only)
    G                       stage 1 with the LM loss only (`loss.contrastive=0 loss.swap=0`): embeddings read out
                            untrained
    G+C                     stage 1 as the demo trains it
    G+C+M                   stages 1 -> 2 -> 3 (the demo's final model)
    G+C+M without matching  stage 3 with `loss.matching=0`
    without stage 1         stage 2 from scratch -> stage 3
    without stage 2         stage 1 -> stage 3
    fixed 1 / 5 / 10, adaptive   the G+C+M model embedding every video with exactly k tokens, or adaptively
                            (10 is past the tiny recipes' maximum of 8: the last step's stop bias is reused);
                            besides each row's own evaluation, the four lengths are timed side by side on the same
                            clips and model ("embed ms / video": prefill + decode + head; `paired_embed_ms`)

Every training runs the tiny recipe's whole schedule (the demo's; 17 trainings, ~1.5 h two at a time on 2 cores), or
with `--steps f` (one f for every stage, or one per stage) at f times its length: max_steps, warmup and checkpoint
interval scaled, the cosine decay over the shorter run. Half the length takes 42 min but leaves the rows inside each
other's spread (docs/design.md). A runs folder keeps one length: another is refused.

Headline rows (C, G+C, G+C+M and the fixed/adaptive comparison) run with three seeds and report mean and spread
(min..max); the others with seed 0, the demo's seeds. Seed s > 0 adds 100 * s to every stage's `train.seed` and
`data.seed`, so the spread covers initialisation and data order. Trainings are shared between rows (G+C+M continues
G+C's stage 1) and run first, `--jobs` at once (default 2: two 1-thread trainings on 2 cores do ~1.2x the work of one
2-thread training; docs/design.md), each once its parent is trained; evaluations follow one at a time, so nothing
else runs while a row is timed. A finished stage is never retrained, an interrupted one resumes from its
checkpoint, and an evaluated row is read back from its JSON: rerunning the command after a crash continues where it
stopped.

Every row also reports the attribute-binding check (2-way accuracies, chance 50) when `DATA/binding` exists.

Output: `RUNS/ablation.md` (table), `RUNS/ablation.json` (every number and seed), `RUNS/ablation.png` (T2V R@1 per
row with the seeds' spread, and R@1 against ms per video for fixed and adaptive lengths), `RUNS/schedule.json`
(the --steps its trainings ran at).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from . import demo

HEADLINE_SEEDS = (0, 1, 2)
# Every training at its recipe's whole length by default. Half (--steps 0.5) fits the 17 trainings in 42 min two at
# a time on 2 cores, against ~1.5 h, but stops stage 1 before retrieval and binding take off: G+C and C overlap and
# binding is at chance (docs/experiments.md, 2026-12-06, "half the steps"). A shorter run is for a quick look.
STEPS = (1.0, 1.0, 1.0)  # stages 1, 2, 3


@dataclass(frozen=True)
class Node:
    """One training run: recipes/tiny/stage{stage}.yaml from `parent`'s final model (None: from scratch)."""
    name: str
    stage: int
    parent: str | None
    overrides: tuple = ()


NODES = {n.name: n for n in (
    Node("gc1", 1, None),
    # C drops stage 1's QA batches too: with loss.lm=0 they would cost tower passes and train nothing.
    Node("c1", 1, None, ("loss.lm=0", "train.tasks.qa=0")),
    Node("g1", 1, None, ("loss.contrastive=0", "loss.swap=0")),
    Node("gc2", 2, "gc1"),
    Node("gcm3", 3, "gc2"),
    Node("gcm3-no-matching", 3, "gc2", ("loss.matching=0",)),
    Node("no1-2", 2, None),
    Node("no1-3", 3, "no1-2"),
    Node("no2-3", 3, "gc1"),
)}


@dataclass(frozen=True)
class Row:
    name: str
    node: str
    seeds: tuple = (0,)
    fixed_tokens: int | None = None  # embed every video with exactly this many tokens (None: adaptive)
    tasks: tuple = ("retrieval", "adaptive", "binding")


ROWS = (
    Row("C", "c1", HEADLINE_SEEDS),
    Row("G", "g1"),
    Row("G+C", "gc1", HEADLINE_SEEDS),
    Row("G+C+M", "gcm3", HEADLINE_SEEDS),
    Row("G+C+M without matching", "gcm3-no-matching"),
    Row("without stage 1", "no1-3"),
    Row("without stage 2", "no2-3"),
    Row("fixed 1", "gcm3", HEADLINE_SEEDS, fixed_tokens=1),
    Row("fixed 5", "gcm3", HEADLINE_SEEDS, fixed_tokens=5),
    Row("fixed 10", "gcm3", HEADLINE_SEEDS, fixed_tokens=10),
)
METRICS = ("T2V R@1", "V2T R@1", "T2V R@5", "binding T2V", "binding V2T", "mean tokens", "ms / video",
           "embed ms / video")
# The length rows, timed side by side on one G+C+M model per seed (`paired_embed_ms`): None = adaptive.
LENGTHS = {"G+C+M": None, "fixed 1": 1, "fixed 5": 5, "fixed 10": 10}


def seed_overrides(stage: int, seed: int) -> list[str]:
    """Seed 0: the recipes' own seeds (the demo's); seed s: every seed + 100 s."""
    if seed == 0:
        return []
    return [f"train.seed={stage + 100 * seed}", f"data.seed={stage + 100 * seed}"]


def schedule_overrides(stage: int, steps: float) -> list[str]:
    """Tiny stage `stage`'s schedule at `steps` times the recipe's length (1: the demo's own, no override): its
    `train.max_steps`, `optim.warmup_steps` and `train.save_every`, each rounded and at least 1 (warmup at least 0).
    The cosine decay follows max_steps, so a shorter run is a whole schedule, not a cut-off long one."""
    if steps == 1:
        return []
    from .config import read_yaml

    raw = read_yaml(f"recipes/tiny/stage{stage}.yaml")
    return [f"train.max_steps={max(1, round(raw.train.max_steps * steps))}",
            f"optim.warmup_steps={max(0, round(raw.optim.warmup_steps * steps))}",
            f"train.save_every={max(1, round(raw.train.save_every * steps))}"]


def _node_extra(name: str, seed: int, parent_final: str | None, extra: list[str], steps: tuple = STEPS) -> list[str]:
    # demo.train_stage names its folder stage{k} and initialises from stage{k-1} under the same root; the explicit
    # init_from below (listed after its own) points it at this node's parent instead.
    node = NODES[name]
    return [*seed_overrides(node.stage, seed), *schedule_overrides(node.stage, steps[node.stage - 1]),
            f"train.init_from={parent_final or 'null'}", *node.overrides, *extra]


def train_node(name: str, seed: int, data: str, runs: str, extra: list[str], steps: tuple = STEPS) -> str:
    """Train `name` (and its parents first) for `seed`, in this process; -> its final model folder. Finished stages
    are reused."""
    node = NODES[name]
    parent = train_node(node.parent, seed, data, runs, extra, steps) if node.parent else None
    return demo.train_stage(node.stage, data, os.path.join(runs, f"seed{seed}", name),
                            _node_extra(name, seed, parent, extra, steps))


def node_args(name: str, seed: int, data: str, runs: str, extra: list[str],
              steps: tuple = STEPS) -> tuple[list[str], str]:
    """`python -m ville.train` arguments of `name` for `seed` (what `train_node` runs) and its final model folder."""
    node = NODES[name]
    parent = node_args(node.parent, seed, data, runs, extra, steps)[1] if node.parent else None
    return demo.stage_args(node.stage, data, os.path.join(runs, f"seed{seed}", name),
                           _node_extra(name, seed, parent, extra, steps))


def trainings(rows: list[Row], max_seeds: int | None) -> list[tuple[str, int]]:
    """Every (node, seed) training the rows need, each once, parents before children."""
    out: list[tuple[str, int]] = []
    for row in rows:
        for seed in row.seeds[: max_seeds or None]:
            chain, name = [], row.node
            while name:
                chain.append(name)
                name = NODES[name].parent
            out += [(n, seed) for n in reversed(chain) if (n, seed) not in out]
    return out


def run_trainings(todo: list[tuple[str, int]], jobs: int, start, poll_s: float = 1.0) -> None:
    """Run the trainings `todo` (parents before children), at most `jobs` at once, each once its parent has finished;
    the longest remaining chain goes first. `start(name, seed)` -> a process (`poll()`, `send_signal()`, `wait()`, and
    `log`, its log file), or None when there is nothing to train. After a failure nothing new starts, the running
    ones finish, then one line names the failed training and its log. An interrupt (or any error here) passes SIGTERM
    to the running trainings, which save a checkpoint and stop: the next invocation resumes them."""
    children: dict[tuple[str, int], list] = {t: [] for t in todo}
    for name, seed in todo:
        if (NODES[name].parent, seed) in children:
            children[(NODES[name].parent, seed)].append((name, seed))

    def chain(t) -> int:
        return 1 + max((chain(c) for c in children[t]), default=0)

    waiting = sorted(todo, key=lambda t: -chain(t))  # stable: the rows' order among equal chains
    done, running, failed = set(), {}, []

    def ready():
        return [t for t in waiting if (NODES[t[0]].parent, t[1]) not in children or (NODES[t[0]].parent, t[1]) in done]

    try:
        while (waiting and not failed) or running:
            while len(running) < jobs and not failed and ready():
                t = ready()[0]
                waiting.remove(t)
                proc = start(*t)
                if proc is None:
                    done.add(t)
                else:
                    running[t] = proc
            for t, proc in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    del running[t]
                    if rc == 0:
                        done.add(t)
                    else:
                        failed.append((t, rc, proc.log))
            if running:
                time.sleep(poll_s)
    except BaseException:
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            proc.wait()
        raise
    if failed:
        (name, seed), rc, log = failed[0]
        raise SystemExit(f"[ablate] training {name} (seed {seed}) failed with exit code {rc}; its log: {log}")


def start_training(name: str, seed: int, data: str, runs: str, extra: list[str], threads: int, steps: tuple = STEPS):
    """`node_args` as a `python -m ville.train` subprocess with `threads` CPU threads, its output in
    RUNS/seed{seed}/{name}/stage{k}.log; None when its final model exists."""
    args, final = node_args(name, seed, data, runs, extra, steps)
    if demo.trained(final):
        print(f"[ablate] {name} (seed {seed}): {final} exists, not retraining")
        return None
    log = os.path.dirname(final) + ".log"  # beside the run folder RUNS/seed{seed}/{name}/stage{k}
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print(f"[ablate] training {name} (seed {seed}, {threads} thread(s); log {log}): python -m ville.train "
          f"{' '.join(args)}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ville.train", *args, f"train.threads={threads}"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    return proc


def evaluate_row(row: Row, seed: int, final: str, data: str, runs: str, eval_clips: int) -> dict:
    """The row's headline numbers for one seed, read back from its JSON when it was evaluated before."""
    from .eval import evaluate
    from .model import ViLLE

    out = os.path.join(runs, "eval", f"{row.name.replace(' ', '_').replace('/', '-')}-seed{seed}.json")
    if os.path.isfile(out):
        with open(out) as f:
            return json.load(f)["ablation"]
    if row.fixed_tokens is None:
        res = evaluate(final, data, tasks=list(row.tasks), split="test", max_clips=eval_clips, out=out)
    else:
        model = ViLLE.from_pretrained(final)
        e = model.cfg.embed
        e.min_embed_tokens = e.max_embed_tokens = row.fixed_tokens
        # No cache: the cache is keyed by the trained model, and its embeddings are the adaptive ones.
        res = evaluate(model, data, tasks=list(row.tasks), split="test", max_clips=eval_clips, out=out, cache_dir="")
    ret = res["retrieval"]["single_caption"]
    ad = res["adaptive"]
    numbers = {"T2V R@1": ret["t2v"]["R@1"], "V2T R@1": ret["v2t"]["R@1"], "T2V R@5": ret["t2v"]["R@5"],
               "mean tokens": ad["mean_tokens"], "ms / video": ad["latency_ms_per_video"]["median"],
               "chance T2V R@1": ret["chance"]["t2v"]["R@1"]}
    bi = res.get("binding", {})
    if bi.get("num_pairs"):  # the benchmark folder has the binding pairs (python -m data_tools.binding)
        numbers.update({"binding T2V": bi["t2v"], "binding V2T": bi["v2t"]})
    with open(out) as f:
        saved = json.load(f)
    saved["ablation"] = numbers
    with open(out, "w") as f:
        json.dump(saved, f, indent=1)
    return numbers


def paired_embed_ms(final: str, data: str, runs: str, seed: int, clips: int = 64, batch: int = 8,
                    repeats: int = 9) -> dict[str, float]:
    """ms per video of the embedding itself (prefill + decode + head, from tower features computed once) for every
    length of LENGTHS on one model, side by side: each repeat times every length over the same `clips` test clips in
    batches of `batch`, in an order rotated by one per repeat (so drift in the machine's speed falls on all of them
    alike); -> the median over repeats per row. The tower pass is the same for every length and is left out (the
    whole call, tower included, is the rows' "ms / video", timed in separate evaluations). Read back from its JSON
    when it was measured before."""
    import torch

    from .data import iter_eval_clips
    from .eval.common import split_shards
    from .model import ViLLE

    out = os.path.join(runs, "eval", f"embed-ms-seed{seed}.json")
    if os.path.isfile(out):
        with open(out) as f:
            return json.load(f)["median"]
    model = ViLLE.from_pretrained(final).eval()
    size = model.vision.input_size  # decoded at the tower's input size, as ville.eval decodes them
    size = size[0] if size[0] == size[1] else None
    feats, n = [], 0
    with torch.no_grad():
        for b in iter_eval_clips(split_shards(data, "test"), model.cfg.vision.max_frames, batch_size=batch,
                                 frame_size=size):
            take = b["frames"][: clips - n]
            feats.append(model.vision.frame_features(take.to(model.device)))
            n += len(take)
            if n >= clips:
                break
        rows = list(LENGTHS)
        times: dict[str, list[float]] = {r: [] for r in rows}
        for r in range(repeats + 1):  # repeat 0 warms every path up and is not kept
            for row in rows[r % len(rows):] + rows[: r % len(rows)]:
                t = time.perf_counter()
                for f in feats:
                    model.embed_video(None, features=f, num_tokens=LENGTHS[row])
                if r:
                    times[row].append(1000.0 * (time.perf_counter() - t) / n)
    median = {row: round(statistics.median(v), 3) for row, v in times.items()}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"protocol": paired_embed_ms.__doc__.split("\n\n")[0], "clips": n, "batch": batch,
                   "device": str(model.device), "median": median, "all": times}, f, indent=1)
    return median


def summarise(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """{row: {seed: numbers}} -> {row: {metric: {"mean", "min", "max", "n"}}}."""
    out = {}
    for row, by_seed in results.items():
        out[row] = {}
        for m in METRICS:
            values = [v[m] for v in by_seed.values() if v.get(m) is not None]
            if values:
                out[row][m] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                               "n": len(values)}
    return out


def markdown(summary: dict[str, dict[str, dict]]) -> str:
    """Mean over seeds, with min..max where there are several."""
    lines = ["| row | seeds | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for row, ms in summary.items():
        n = max((s["n"] for s in ms.values()), default=0)
        cells = []
        for m in METRICS:
            s = ms.get(m)
            if s is None:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.2f} ({s['min']:.2f}..{s['max']:.2f})")
            else:
                cells.append(f"{s['mean']:.2f}")
        lines.append(f"| {row} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in summary if not r.startswith("fixed") and "T2V R@1" in summary[r]]
    means = [summary[r]["T2V R@1"]["mean"] for r in rows]
    err = [[m - summary[r]["T2V R@1"]["min"] for r, m in zip(rows, means)],
           [summary[r]["T2V R@1"]["max"] - m for r, m in zip(rows, means)]]
    left.bar(range(len(rows)), means, yerr=err, capsize=4, color="tab:blue")
    left.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    left.set_ylabel("T2V R@1 (%)")
    left.set_title("ablations (bars: min..max over seeds)")
    for r in ("fixed 1", "fixed 5", "fixed 10", "G+C+M"):
        if r in summary and "embed ms / video" in summary[r]:
            r1 = summary[r]["T2V R@1"]
            right.errorbar(summary[r]["embed ms / video"]["mean"], r1["mean"],
                           yerr=[[r1["mean"] - r1["min"]], [r1["max"] - r1["mean"]]],
                           fmt="o", capsize=4, label=r if r != "G+C+M" else "adaptive")
    right.set_xlabel("ms per video (embedding without the tower, side by side)")
    right.set_ylabel("T2V R@1 (%)")
    right.set_title("fixed vs adaptive embedding length")
    if right.get_legend_handles_labels()[0]:  # no length rows among --rows: an empty panel, no legend
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ville.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--runs", default="runs/ablate")
    ap.add_argument("--rows", nargs="*", help=f"only these rows (default: all of {[r.name for r in ROWS]})")
    ap.add_argument("--seeds", type=int, help="at most this many seeds per headline row (default 3)")
    ap.add_argument("--eval-clips", type=int, default=200, help="clips of the test split per evaluation")
    ap.add_argument("--train-overrides", nargs="*", default=[], help="extra dotted overrides for every training")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="trainings at once, each a subprocess with CPU cores / jobs threads (default: 2 when there "
                         "are 2 cores or more; 1: one after another, in this process)")
    ap.add_argument("--steps", type=float, nargs="+", default=[1.0],
                    help="each training's schedule at this fraction of its tiny recipe's steps: one for every stage, "
                         "or one per stage 1 2 3 (default 1: the demo's schedules; 0.5 took 42 min instead of ~1.5 h "
                         "on 2 cores, but its rows do not separate)")
    for name, default in (("num-train", 3000), ("num-val", 100), ("num-test", 300), ("num-compositional", 200),
                          ("num-composed", 200)):
        ap.add_argument(f"--{name}", type=int, default=default, help="benchmark size when it must be generated")
    args = ap.parse_args(argv)
    known = {r.name: r for r in ROWS}
    unknown = [r for r in args.rows or [] if r not in known]
    if unknown:
        print(f"error: --rows: unknown row(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs: expected >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    steps = tuple(args.steps * 3 if len(args.steps) == 1 else args.steps)
    if len(steps) != 3 or not all(0 < f <= 1 for f in steps):
        print(f"error: --steps: expected one fraction in (0, 1], or one per stage (3), got {args.steps}",
              file=sys.stderr)
        return 2
    marker = os.path.join(args.runs, "schedule.json")  # trainings at another length must not be reused
    before = None
    if os.path.isfile(marker):
        with open(marker) as f:
            before = tuple(json.load(f)["steps"])
    elif any(d.startswith("seed") for d in (os.listdir(args.runs) if os.path.isdir(args.runs) else [])):
        before = STEPS  # trained before --steps existed: at the recipes' own length
    if before is not None and before != steps:
        shown = " ".join(f"{f:g}" for f in before)
        print(f"error: --steps {' '.join(f'{f:g}' for f in steps)}: {args.runs} holds trainings at --steps {shown}; "
              f"pass --steps {shown}, or another --runs", file=sys.stderr)
        return 2
    rows = [known[r] for r in args.rows] if args.rows else list(ROWS)
    t0 = time.time()
    os.makedirs(args.runs, exist_ok=True)
    with open(marker, "w") as f:
        json.dump({"steps": list(steps)}, f)
    demo.generate(args.data, args)
    demo.generate_binding(args.data)
    todo = trainings(rows, args.seeds)
    if args.jobs == 1:
        for name, seed in todo:
            train_node(name, seed, args.data, args.runs, args.train_overrides, steps)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        run_trainings(todo, args.jobs, lambda name, seed: start_training(name, seed, args.data, args.runs,
                                                                         args.train_overrides, threads, steps))
    print(f"[ablate] {len(todo)} trainings ready ({time.time() - t0:.0f} s)")
    results: dict[str, dict[int, dict]] = {}
    for row in rows:
        for seed in row.seeds[: args.seeds or None]:
            final = node_args(row.node, seed, args.data, args.runs, args.train_overrides, steps)[1]
            t = time.time()
            results.setdefault(row.name, {})[seed] = evaluate_row(row, seed, final, args.data, args.runs,
                                                                  args.eval_clips)
            print(f"[ablate] {row.name}, seed {seed}: {results[row.name][seed]} ({time.time() - t:.0f} s to evaluate)")
    for seed in sorted({s for r in LENGTHS for s in results.get(r, {})}):
        ms = paired_embed_ms(node_args("gcm3", seed, args.data, args.runs, args.train_overrides, steps)[1],
                             args.data, args.runs, seed)
        for row in LENGTHS:
            if seed in results.get(row, {}):
                results[row][seed]["embed ms / video"] = ms[row]
        print(f"[ablate] embedding ms per video side by side, seed {seed}: {ms}")
    summary = summarise(results)
    header = (f"ville ablations: {args.num_train} synthetic training clips, {args.eval_clips} test clips, "
              f"stages 1 / 2 / 3 at {' / '.join(f'{f:g}' for f in steps)} x the tiny recipes' steps; "
              f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} CPU, {time.time() - t0:.0f} s "
              f"(this invocation; finished trainings and evaluations are reused)")
    table = markdown(summary)
    print(header)
    print(table)
    os.makedirs(args.runs, exist_ok=True)
    with open(os.path.join(args.runs, "ablation.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    with open(os.path.join(args.runs, "ablation.json"), "w") as f:
        json.dump({"header": header, "summary": summary,
                   "seeds": {r: {str(s): v for s, v in by.items()} for r, by in results.items()}}, f, indent=1)
    plot(summary, os.path.join(args.runs, "ablation.png"))
    print(f"[ablate] {args.runs}/ablation.md, ablation.json, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
