"""Training from the real tiny recipe files: every stage trains, exact resume after kill -9 and after a stop signal
sent to the whole process group (1 process, and 2 gloo processes under torchrun), a non-finite loss or gradient stops
before saving blown-up weights, a corrupted newest checkpoint falls back to the previous one, data with nothing usable
is one error line, bad recipes fail naming key and file, 2 gloo processes match 1 process."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ville import trainer
from ville.train import load_recipe, main

# Small and fast, but the real recipe files: fewer frames and embedding steps, tiny batches.
FAST = ["data.num_frames=4", "model.embed.max_embed_tokens=3", "data.num_workers=0", "train.log_every=1",
        "train.tensorboard=false", "optim.warmup_steps=2", "data.shuffle_buffer=16"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "-m", "data_tools.synth", "--out", str(out), "--seed", "0", "--num-train", "32",
                    "--num-val", "4", "--num-test", "4", "--num-compositional", "2", "--num-composed", "2",
                    "--shard-size", "8", "--no-progress", "--workers", "1"], check=True, capture_output=True)
    return str(out)


def overrides(recipe: str, synth: str, out_dir, batch: int = 2, **extra) -> list[str]:
    tasks = load_recipe(recipe, [f"data.train_shards={synth}/train/shard-*.tar"]).train.tasks
    ov = FAST + [f"data.train_shards={synth}/train/shard-*.tar", f"train.out_dir={out_dir}"]
    ov += [f"train.tasks.{t}={batch}" for t in tasks]
    ov += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return ov


def losses(out_dir) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_three_stages_train_from_their_recipes(synth, tmp_path):
    prev = None
    for stage in (1, 2, 3):
        out = tmp_path / f"s{stage}"
        # batch 2 per task: let stage 1's rank-target halting run anyway (it needs global batches >= 16); stages 2-3
        # take their halting targets from detailed-caption sentence counts, whatever the batch
        ov = overrides(f"recipes/tiny/stage{stage}.yaml", synth, out, train__max_steps=2, train__save_every=1,
                       loss__halting_min_batch=2)
        ov.append(f"train.init_from={prev}" if prev else "train.init_from=null")
        assert main([f"recipes/tiny/stage{stage}.yaml", *ov]) == 0
        rec = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert [r["step"] for r in rec] == [1, 2] and all(r["loss"] > 0 for r in rec)
        assert os.path.isfile(out / "final" / "model.safetensors") and os.path.isfile(out / "final" / "recipe.yaml")
        prev = out / "final"
    comps = set(rec[0])  # stage 3 logs each loss component separately
    for c in ("lm_qa", "lm_caption", "contrastive_retrieval", "localisation", "matching", "contrastive_composed",
              "halting_detailed_caption"):
        assert c in comps, c
    assert "halting_retrieval" not in comps  # sentence targets: only detailed captions feed halting
    s1 = [json.loads(x) for x in open(tmp_path / "s1" / "metrics.jsonl")]
    assert "halting_caption" in s1[0]  # stage 1: rank targets from its caption batch
    # The logged lr is the one each step applied: warmup over 2 steps gives factors 1/2 and 1 (the rate read after
    # the schedule advanced would give 1 and 1).
    assert s1[0]["lr"] == pytest.approx(0.5 * s1[1]["lr"])


def test_progress_bar_shows_the_step_just_taken(synth, tmp_path, monkeypatch):
    import tqdm

    shown = []

    class Bar:  # what the console bar would draw at each update
        def __init__(self, *args, **kwargs):
            self.postfix = {}

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def update(self, n):
            shown.append(self.postfix.get("loss"))

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    out = tmp_path / "run"
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=3, train__save_every=10)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 0
    assert shown == [f"{loss:.4f}" for loss in losses(out).values()]


def checkpoints(out_dir) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(out_dir, "checkpoints")) if n.endswith(".pt"))


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ville.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(out_dir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path) and max(losses(out_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


@pytest.fixture(scope="module")
def reference_dir(synth, tmp_path_factory):
    """An uninterrupted 6-step run; its folder keeps the checkpoints of steps 4 and 6."""
    out = tmp_path_factory.mktemp("ref")
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6, train__save_every=2)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 0
    return out


@pytest.fixture(scope="module")
def reference_run(reference_dir):
    return losses(reference_dir)


def test_kill9_then_resume_is_exact(synth, tmp_path, reference_run):
    out = tmp_path / "run"
    args = ["recipes/tiny/stage1.yaml", *overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6,
                                                   train__save_every=2)]
    proc = _run(args)
    _wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(out / "checkpoints"), "a checkpoint must exist after step 2"
    proc = _run(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resumed from" in err
    assert losses(out) == reference_run  # bit-identical loss curve, every step


def test_process_group_sigterm_saves_and_resumes(synth, tmp_path, reference_run):
    """kill -TERM -- -PGID, as Slurm, Kubernetes and timeout send it: the DataLoader worker (same group) ignores it,
    the main process saves once, shuts the worker down and exits 0; the resumed curve is bit-identical."""
    out = tmp_path / "run"
    # 1 worker: the same stream as 0 workers (the reference), and a worker process in the group to be signalled
    args = ["recipes/tiny/stage1.yaml", *overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6,
                                                   train__save_every=100, data__num_workers=1)]
    proc = _run(args, start_new_session=True)  # its own process group, as a batch job has
    _wait_for_step(out, 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert re.search(r"SIGTERM: saved a checkpoint at step [1-5] ", err) and "Traceback" not in err, err[-2000:]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # nothing of the group is left: the worker was shut down
        os.killpg(proc.pid, 0)
    assert len(checkpoints(out)) == 1 and not (out / "final").exists()
    proc = _run(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert losses(out) == reference_run
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert record["skipped_samples"] == record["skip_encounters"] == 0


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGINT"])
def test_other_stop_signals_save_at_the_next_step(synth, tmp_path, monkeypatch, capsys, name):
    sig = getattr(signal, name)
    log = trainer.Logger.log

    def log_then_signal(self, step, record):  # the signal arrives while step 2 is being logged
        log(self, step, record)
        if step == 2:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(trainer.Logger, "log", log_then_signal)
    out = tmp_path / "run"
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6, train__save_every=100)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 0
    assert f"{sig.name}: saved a checkpoint at step 3" in capsys.readouterr().err
    assert checkpoints(out) == ["step-00000003.pt"] and not (out / "final").exists()
    assert signal.getsignal(sig) is not None  # the caller's handler is back


def test_unknown_stop_signal(capsys):
    assert main(["recipes/tiny/stage1.yaml", "train.stop_signals=[SIGTERM,SIGNOPE]"]) == 2
    assert "train.stop_signals: 'SIGNOPE'" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_keeps_checkpoint(synth, tmp_path, capsys):
    out = tmp_path / "run"
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6, train__save_every=2,
                   train__inject_nan_at_step=3)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 4" in err
    assert checkpoints(out) == ["step-00000002.pt"]
    assert f"Last good checkpoint: {out}/checkpoints/step-00000002.pt" in err
    assert not (out / "final").exists()


def test_blown_up_weights_are_never_saved(synth, tmp_path, capsys):
    """lr 1e6: step 1's weights are ~5e5, step 2's gradient is NaN. The run stops there, before the optimizer
    applies it, and every checkpoint on disk is finite, parameters and optimizer state (one is saved each step)."""
    out = tmp_path / "run"
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6, train__save_every=1, optim__lr=1e6)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 3
    err = capsys.readouterr().err
    assert "non-finite gradient norm" in err and "at step 2" in err
    assert f"Last good checkpoint: {out}/checkpoints/step-00000001.pt" in err
    assert checkpoints(out) == ["step-00000001.pt"]
    state = torch.load(out / "checkpoints" / "step-00000001.pt", weights_only=True)
    tensors = list(state["model"].values()) + [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_corrupt_newest_checkpoint_falls_back(synth, reference_dir, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference_dir / "checkpoints", out / "checkpoints")
    shutil.copy(reference_dir / "metrics.jsonl", out / "metrics.jsonl")
    newest = out / "checkpoints" / "step-00000006.pt"
    with open(newest, "r+b") as f:  # one flipped byte mid-file: same size, different checksum
        f.seek(os.path.getsize(newest) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    ov = overrides("recipes/tiny/stage1.yaml", synth, out, train__max_steps=6, train__save_every=2)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 0
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "SHA-256" in warnings[0]
    assert "at step 4" in err
    assert losses(out) == reference_run  # steps 5 and 6 recomputed from step 4, bit-identical


def test_nothing_usable_is_one_error_line(tmp_path, capsys):
    sys.path.insert(0, os.path.dirname(__file__))
    import fixtures as F

    nocap = F.write_shard(str(tmp_path / "nocap-000000.tar"), [(f"n{i}", {"mp4": b"x", "json": {"duration": 1}})
                                                               for i in range(4)])
    empty = F.write_shard(str(tmp_path / "empty-000000.tar"), [])
    ov = [f"data.train_shards={tmp_path}/*.tar", f"train.out_dir={tmp_path / 'run'}", "train.tasks.caption=2",
          "train.max_steps=2", *FAST]
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: no usable caption sample"), err
    assert nocap in errors[0] and "missing key: 4 distinct" in errors[0]
    assert empty in errors[0] and "empty shard: 1 distinct" in errors[0]
    assert "Traceback" not in err


def test_typo_key_fails_naming_key_and_file(capsys):
    assert main(["recipes/tiny/stage1.yaml", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "recipes/tiny/stage1.yaml" in err and "train.max_stepz" in err


def test_bad_value_in_file(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    text = open("recipes/tiny/stage1.yaml").read()
    bad_text = re.sub(r"max_steps: \d+", "max_steps: lots", text)
    assert bad_text != text
    bad.write_text(bad_text)
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml" in err and "train.max_steps" in err


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_real_recipes_dry_run(stage, capsys):
    off = ["model.init_from_vlm=null", "model.vision.pretrained=false", "model.llm.pretrained=false",
           "model.llm.tokenizer=builtin"]
    assert main([f"recipes/stage{stage}.yaml", "--dry-run", *off]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] > 2e9 and report["trainable"] > 0


def test_two_gloo_processes_match_one_through_a_signal(synth, tmp_path):
    """Same global batch, 1 process vs torchrun with 2 (gloo): the same loss curve. Contrastive negatives are
    gathered across ranks with gradient, so this also checks the distributed loss and its gradients. The 2-process run
    is signalled through its process group mid-run (torchrun and both ranks get SIGTERM; torchrun then signals the
    ranks' groups again): both ranks stop at the same step, one checkpoint is saved, and the resumed run continues
    the same curve."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=8, train__save_every=100)
    assert main(["recipes/tiny/stage1.yaml", *overrides("recipes/tiny/stage1.yaml", synth, one, batch=4,
                                                        **common)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "ville.train", "recipes/tiny/stage1.yaml",
           *overrides("recipes/tiny/stage1.yaml", synth, two, batch=4, **common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _wait_for_step(two, 1, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    saved = re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", err)
    assert len(saved) == 1 and int(saved[0]) < 8, err[-3000:]  # rank 0 reports; both ranks took part in the save
    assert checkpoints(two) == [f"step-{int(saved[0]):08d}.pt"] and not (two / "final").exists()
    # torchrun itself ends with its own SignalException traceback (torch's behaviour); no rank may fail
    assert err.count("Traceback") == 1 and "ChildFailedError" not in err and "exitcode" not in err, err[-3000:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() == set(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), (step, a, b)


def test_contrastive_chunk_gives_the_same_run(synth, tmp_path, capsys):
    """train.contrastive_chunk (gradient caching of the caption contrastive + halting terms): the same loss curve as
    the plain run, in one process (chunks of 1 of a batch of 2) and in 2 gloo processes (its gradients reduced by
    hand, past the DDP wrapper). Swapped-word negatives are off: gradient caching does not support them (one line
    says so)."""
    plain, one, two = tmp_path / "plain", tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=6, train__save_every=2, loss__swap=0)
    assert main(["recipes/tiny/stage1.yaml", *overrides("recipes/tiny/stage1.yaml", synth, plain, **common)]) == 0
    reference_run = losses(plain)
    ov = overrides("recipes/tiny/stage1.yaml", synth, one, train__contrastive_chunk=1, **common)
    assert main(["recipes/tiny/stage1.yaml", *ov]) == 0
    assert main(["recipes/tiny/stage1.yaml", *overrides("recipes/tiny/stage1.yaml", synth, tmp_path / "swap",
                                                        train__max_steps=1, train__contrastive_chunk=1)]) == 2
    assert "train.contrastive_chunk: loss.swap (swapped-word negatives) is not supported" in capsys.readouterr().err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29735",
           "-m", "ville.train", "recipes/tiny/stage1.yaml",
           *overrides("recipes/tiny/stage1.yaml", synth, two, train__contrastive_chunk=1, **common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in (losses(one), losses(two)):
        assert run.keys() == reference_run.keys()
        for step in run:
            assert run[step] == pytest.approx(reference_run[step], rel=1e-5), (step, run, reference_run)
