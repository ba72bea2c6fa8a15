"""The demo's choices on the val split: each setting is the best of its grid by the val metric (first wins ties),
and a dataset without val changes nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_cfg

from ville import ViLLE
from ville import demo as D
from ville import eval as E

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tune_on_val_picks_the_best_of_each_grid(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_tools.synth", "--out", str(data), "--seed", "5", "--num-train", "2",
                    "--num-val", "5", "--num-test", "0", "--num-compositional", "0", "--num-composed", "0",
                    "--workers", "1", "--no-progress"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    cfg = tiny_cfg("llama")
    cfg.vision.motion = cfg.embed.stop_motion = True
    torch.manual_seed(0)
    ViLLE(cfg).save_pretrained(str(tmp_path / "model"))
    # The grids and the choice rule are the demo's own.
    defaults = dict(batch_size=8, progress=False)
    real = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: real(*a, **{**defaults, **k}))
    chosen = D.tune_on_val(str(tmp_path / "model"), str(data), str(tmp_path / "runs"), max_clips=5)
    assert set(chosen) == {"rerank_score", "rerank_fusion", "moment_scales", "moment_score"}
    assert len(D.RERANK_GRID) == 2 * len(D.FUSION_GRID)  # both scores, each alone and fused at every weight
    for grid, task, metric in ((D.RERANK_GRID, "rerank", lambda r: r["stage2"]["R@1"]),
                               (D.MOMENT_GRID, "moment", lambda r: r["R1@0.5"])):
        scores = [metric(real(str(tmp_path / "model"), str(data), tasks=[task], split="val", max_clips=5,
                              out=str(tmp_path / "runs" / "eval" / "check.json"), **{**defaults, **options})[task])
                  for options in grid]
        best = grid[scores.index(max(scores))]
        assert {k: chosen[k] for k in best} == best, (task, scores)
    assert "re-ranking on val" in capsys.readouterr().out
    os.rename(data / "val", data / "elsewhere")
    assert D.tune_on_val(str(tmp_path / "model"), str(data), str(tmp_path / "runs"), max_clips=5) == {}
