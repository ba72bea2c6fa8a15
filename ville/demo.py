"""The demo (`make demo`): synthetic benchmark -> tiny stages 1-3 -> evaluation -> the table.

1. `python -m data_tools.synth` writes the benchmark to `data/synth` unless it is already there (same seed, same
   bytes). It runs as a subprocess: `ville` never imports `data_tools`. `python -m data_tools.binding` writes the
   attribute-binding pairs (fresh clips) to `data/synth/binding` the same way, unless they are there.
2. `recipes/tiny/stage{1,2,3}.yaml` train in turn, each initialised from the previous stage's final model. A
   stage whose `final/` exists is not retrained (delete `runs/tiny` to start over); an interrupted stage resumes
   from its last checkpoint.
3. Each stage's final model is evaluated on the test split (stage 3 also on the compositional split and on
   every task), so the table shows what each stage contributes. Every number is printed beside its baseline.
   The two settings chosen from data, the re-ranking fusion weight and the moment window scoring, are chosen on the
   val split (`tune_on_val`), never on the splits they are reported on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

FUSION_GRID = (None, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # None: the re-ranking score alone
# Re-ranking: the matching head's probability or the LM's caption log-probability (generative matching), each alone
# or fused with the embedding cosine at weight W
RERANK_GRID = tuple({"rerank_score": score, "rerank_fusion": w} for score in ("match", "lm") for w in FUSION_GRID)
MOMENT_LENGTHS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # ville.eval's default candidate window lengths (x duration)
# Moment candidates: all lengths together, scored by the raw or the length-standardised cosine, or one length alone
# (the random-window baseline is always drawn from the same candidates).
MOMENT_GRID = tuple([{"moment_scales": MOMENT_LENGTHS, "moment_score": score} for score in ("cosine", "zscale")]
                    + [{"moment_scales": (length,), "moment_score": "cosine"} for length in MOMENT_LENGTHS])
STAGE_TASKS = {1: ["retrieval", "adaptive", "binding"], 2: ["retrieval", "long_text", "adaptive", "binding"],
               3: ["retrieval", "rerank", "moment", "qa", "composed", "long_text", "adaptive", "binding"]}


def generate(data: str, args) -> None:
    if os.path.isfile(os.path.join(data, "meta.json")):
        print(f"[demo] benchmark found at {data} (delete it to regenerate)")
        return
    cmd = [sys.executable, "-m", "data_tools.synth", "--out", data, "--seed", "0", "--num-train", str(args.num_train),
           "--num-val", str(args.num_val), "--num-test", str(args.num_test), "--num-compositional",
           str(args.num_compositional), "--num-composed", str(args.num_composed), "--shard-size", "250",
           "--workers", str(min(4, os.cpu_count() or 1))]  # the same bytes for any worker count
    print("[demo] generating:", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)


def generate_binding(data: str) -> None:
    """The attribute-binding pairs (fresh clips, not a benchmark split) in `data/binding`; generated on their own so
    a benchmark folder written before they existed gets them too."""
    out = os.path.join(data, "binding")
    if os.path.isfile(os.path.join(out, "meta.json")):
        return
    cmd = [sys.executable, "-m", "data_tools.binding", "--out", out, "--seed", "0", "--num-pairs", "100"]
    print("[demo] generating:", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)


def stage_args(stage: int, data: str, runs: str, extra: list[str]) -> tuple[list[str], str]:
    """`python -m ville.train` arguments for tiny stage `stage` under `runs` (initialised from `runs`' previous stage;
    a later `train.init_from` in `extra` wins), and the folder its final model goes to."""
    out = os.path.join(runs, f"stage{stage}")
    overrides = [f"data.train_shards={data}/train/shard-*.tar", f"train.out_dir={out}",
                 f"train.init_from={os.path.join(runs, f'stage{stage - 1}', 'final')}" if stage > 1
                 else "train.init_from=null", *extra]
    return [f"recipes/tiny/stage{stage}.yaml", *overrides], os.path.join(out, "final")


def trained(final: str) -> bool:
    return os.path.isfile(os.path.join(final, "model.safetensors"))


def train_stage(stage: int, data: str, runs: str, extra: list[str]) -> str:
    from .train import main as train_main

    args, final = stage_args(stage, data, runs, extra)
    if trained(final):
        print(f"[demo] stage {stage}: {final} exists, not retraining")
        return final
    recipe, overrides = args[0], args[1:]
    print(f"[demo] training stage {stage}: python -m ville.train {recipe} {' '.join(overrides)}")
    t0 = time.time()
    if train_main([recipe, *overrides]) != 0:
        raise SystemExit(f"[demo] stage {stage} failed")
    print(f"[demo] stage {stage} trained in {time.time() - t0:.0f} s")
    return final


def tune_on_val(final: str, data: str, runs: str, max_clips: int) -> dict:
    """Evaluation options chosen on the val split: the re-ranking score and fusion weight (`rerank_score`,
    `rerank_fusion`, best stage-2 R@1)
    and the moment candidates (`moment_scales` + `moment_score`, best R1@0.5); the first choice wins ties. {} without
    a val split."""
    from .eval import evaluate

    if not os.path.isdir(os.path.join(data, "val")):
        return {}
    out = os.path.join(runs, "eval", "stage3-val.json")
    chosen = {}
    for what, grid, task, metric in (("re-ranking", RERANK_GRID, "rerank",
                                      lambda r: r["stage2"]["R@1"]),
                                     ("moment candidates", MOMENT_GRID, "moment", lambda r: r["R1@0.5"])):
        scores = []
        for options in grid:  # embeddings, match scores and windows are cached after the first options
            res = evaluate(final, data, tasks=[task], split="val", max_clips=max_clips, out=out, **options)
            scores.append(metric(res[task]))
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        chosen.update(grid[best])
        table = ", ".join(f"{' '.join(f'{v}' for v in o.values())}: {sc}" for o, sc in zip(grid, scores))
        print(f"[demo] {what} on val ({task} {'R@1' if task == 'rerank' else 'R1@0.5'}: {table}) -> {grid[best]}")
    return chosen


def _pick(results: dict) -> dict[str, tuple[float | None, float | None]]:
    """The headline numbers (value, baseline) of one evaluation."""
    out: dict[str, tuple] = {}
    ret = results.get("retrieval", {}).get("single_caption")
    if ret:
        out["T2V R@1"] = (ret["t2v"]["R@1"], ret["chance"]["t2v"]["R@1"])
        out["V2T R@1"] = (ret["v2t"]["R@1"], ret["chance"]["v2t"]["R@1"])
        out["T2V R@5"] = (ret["t2v"]["R@5"], ret["chance"]["t2v"]["R@5"])
    rr = results.get("rerank")
    if rr and rr.get("num_queries"):
        out["T2V R@1 re-ranked"] = (rr["stage2"]["R@1"], rr["stage1"]["R@1"])
    lt = results.get("long_text")
    if lt and lt.get("num_texts"):
        out["long-text T2V R@1"] = (lt["t2v"]["R@1"], lt["chance"]["t2v"]["R@1"])
    mo = results.get("moment")
    if mo and mo.get("num_queries"):
        out["moment R1@0.5"] = (mo["R1@0.5"], mo["random_window"]["R1@0.5"])
        out["moment mIoU"] = (mo["mIoU"], mo["random_window"]["mIoU"])
    qa = results.get("qa")
    if qa and qa.get("num_questions"):
        out["QA accuracy"] = (qa["accuracy"], qa["majority_baseline"])
    co = results.get("composed")
    if co and co.get("num_queries"):
        out["composed R@1"] = (co["R@1"], co["chance"]["R@1"] if isinstance(co["chance"], dict) else co["chance"])
    bi = results.get("binding")
    if bi and bi.get("num_pairs"):
        out["binding T2V acc"] = (bi["t2v"], bi["chance"]["t2v"])
        out["binding V2T acc"] = (bi["v2t"], bi["chance"]["v2t"])
    ad = results.get("adaptive")
    if ad and ad.get("num_videos"):
        out["mean embedding tokens"] = (ad["mean_tokens"], None)
        out["Spearman(tokens, complexity)"] = (ad["spearman_tokens_complexity"], None)
        by = ad.get("mean_tokens_by_complexity", {})
        for c in sorted(by, key=lambda x: int(x)):
            out[f"tokens | complexity {c}"] = (by[c], None)
    return out


def table(columns: dict[str, dict]) -> str:
    names = list(columns)
    metrics: list[str] = []
    for col in columns.values():
        metrics += [m for m in col if m not in metrics]
    rows = [["metric", *names, "baseline"]]
    for m in metrics:
        base = next((columns[n][m][1] for n in names if m in columns[n] and columns[n][m][1] is not None), None)
        label = "stage 1" if m == "T2V R@1 re-ranked" else ""
        rows.append([m, *[("-" if columns[n].get(m, (None,))[0] is None else f"{columns[n][m][0]:.2f}")
                          for n in names], "" if base is None else f"{base:.2f}{' (' + label + ')' if label else ''}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ville.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--runs", default="runs/tiny")
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--num-test", type=int, default=300)
    ap.add_argument("--num-compositional", type=int, default=200)
    ap.add_argument("--num-composed", type=int, default=200)
    ap.add_argument("--eval-clips", type=int, default=200, help="clips per evaluated split")
    ap.add_argument("--train-overrides", nargs="*", default=[], help="extra dotted overrides for every stage")
    args = ap.parse_args(argv)
    t0 = time.time()
    generate(args.data, args)
    generate_binding(args.data)
    finals = {s: train_stage(s, args.data, args.runs, args.train_overrides) for s in (1, 2, 3)}

    from .eval import evaluate, format_table

    t_val = time.time()
    tuned = tune_on_val(finals[3], args.data, args.runs, args.eval_clips)
    print(f"[demo] val choices in {time.time() - t_val:.0f} s")
    columns: dict[str, dict] = {}
    full = {}
    for stage, final in finals.items():
        splits = ["test", "compositional"] if stage == 3 else ["test"]
        for split in splits:
            tasks = STAGE_TASKS[stage] if split == "test" else ["retrieval", "qa", "adaptive"]
            out = os.path.join(args.runs, "eval", f"stage{stage}-{split}.json")
            print(f"[demo] evaluating stage {stage} on {split}: {', '.join(tasks)}")
            t_eval = time.time()
            res = evaluate(final, args.data, tasks=tasks, split=split, max_clips=args.eval_clips, out=out, **tuned)
            print(f"[demo] stage {stage} on {split} evaluated in {time.time() - t_eval:.0f} s")
            columns[f"stage{stage} {split}"] = _pick(res)
            full[f"stage{stage}-{split}"] = res
    print()
    print(format_table(full["stage3-test"]))
    print()
    summary = table(columns)
    header = (f"ville demo: {args.num_train} synthetic training clips, {args.eval_clips} clips per evaluated split; "
              f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} CPU, "
              f"{time.time() - t0:.0f} s in total; chosen on val: {tuned or 'nothing (no val split)'}")
    print(header)
    print(summary)
    with open(os.path.join(args.runs, "demo_results.json"), "w") as f:
        json.dump({"header": header, "table": summary, "columns": columns}, f, indent=1)
    plot = full["stage3-test"].get("adaptive", {}).get("plot")
    if plot:
        print(f"[demo] adaptive-length plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
