"""ville.eval end to end: a tiny random model on a few synthetic clips, every section, the cache, the CLI, and a
2-process gloo run that must give the numbers of a single process."""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ville import ViLLE
from ville import eval as E
from ville import metrics as M
from ville.checkpoint import model_identity
from ville.data import read_shard_index
from ville.head import HeadCfg
from ville.llm import LLMCfg
from ville.model import EmbedCfg, ModelCfg
from ville.video import decode_clip
from ville.vision import VisionCfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES = 4
OPTS = dict(batch_size=8, moment_scales=(0.5, 1.0), qa_max_new_tokens=3, progress=False)


def tiny_cfg() -> ModelCfg:
    llm = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
    return ModelCfg(
        vision=VisionCfg(name="vit_base_patch16_siglip_224", pretrained=False, max_frames=FRAMES,
                         overrides=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)),
        llm=LLMCfg(pretrained=False, tokenizer="builtin", config=copy.deepcopy(llm)),
        head=HeadCfg(num_pool_tokens=8, width=32, num_heads=4, mlp_ratio=2.0, dim=24),
        embed=EmbedCfg(max_embed_tokens=6, min_embed_tokens=1, stop_threshold=0.5))


def tiny_model(seed: int) -> ViLLE:
    torch.manual_seed(seed)
    return ViLLE(tiny_cfg()).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    subprocess.run([sys.executable, "-m", "data_tools.synth", "--out", str(root / "data"), "--seed", "3",
                    "--num-train", "6", "--num-val", "0", "--num-test", "6", "--num-compositional", "4",
                    "--num-composed", "3", "--workers", "1", "--no-progress"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    tiny_model(0).save_pretrained(str(root / "model"))
    return root


@pytest.fixture(scope="module")
def first_run(env):
    out = env / "run" / "results.json"
    out.parent.mkdir()
    return E.evaluate(str(env / "model"), str(env / "data"), out=str(out), **OPTS), out


def _clips(env, split="test"):
    return [(s.key, s.meta) for s in read_shard_index(str(env / "data" / split / "shard-000000.tar"))]


def test_every_section(env, first_run):
    res, out = first_run
    assert json.loads(out.read_text()) == res
    for section in E.TASKS:
        assert isinstance(res[section]["protocol"], str) and res[section]["protocol"], section
    clips = _clips(env)
    meta = res["meta"]
    assert meta["model_identity"] == model_identity(str(env / "model"))
    assert meta["split"] == "test" and meta["counts"]["clips"] == 6 and meta["world_size"] == 1
    assert meta["device"] == "cpu" and meta["date"]

    r = res["retrieval"]
    assert "all_captions" not in r  # synthetic clips have one caption each
    assert r["single_caption"]["chance"]["t2v"]["R@1"] == pytest.approx(100 / 6, abs=0.01)
    assert r["single_caption"]["t2v"]["n"] == 6 and 1 <= r["single_caption"]["t2v"]["MdR"] <= 6
    assert set(res["rerank"]["stage1"]) >= {"R@1", "R@5", "R@10"} and res["rerank"]["k"] == 10
    assert res["rerank"]["stage1"] == r["single_caption"]["t2v"]  # stage 1 is plain single-caption T2V

    m = res["moment"]
    assert m["num_queries"] == sum(len(c["events"]) for _, c in clips)
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP@0.5", "mAP@0.75", "mAP"):
        assert 0 <= m[key] <= 100, key
    assert m["R1@0.7"] <= m["R1@0.5"] <= m["R1@0.3"]
    # Scales (.5, 1) at stride .5: [0, .5], [.25, .75], [.5, 1] and the whole clip.
    assert m["windows_per_clip"] == 4
    assert 0 < m["random_window"]["R1@0.5"] < 100

    q = res["qa"]
    assert q["num_questions"] == sum(len(c["qa"]) for _, c in clips)
    assert q["baseline_source"] == "train" and 0 <= q["majority_baseline"] <= 100
    assert set(q["per_type"]) <= {"colour", "shape", "size", "count", "direction", "order", "background", "existence"}

    c = res["composed"]
    assert c["num_queries"] == 3 and c["gallery_size"] == 12
    assert c["chance"]["R@1"] == pytest.approx(100 / 12, abs=0.01)
    assert {"source_only", "edit_text_only"} <= set(c)

    assert res["long_text"]["num_texts"] == 6

    a = res["adaptive"]
    assert sum(a["histogram"].values()) == 6 and 1 <= a["mean_tokens"] <= 6
    assert set(a["mean_tokens_by_complexity"]) == {str(c["complexity"]) for _, c in clips}
    assert a["latency_ms_per_video"]["median"] > 0
    with open(a["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = E.format_table(res)
    for word in ("retrieval/single_caption", "rerank", "moment", "qa", "composed", "long_text", "adaptive",
                 "chance", "random window", "majority"):
        assert word in table, word


def test_retrieval_numbers_from_the_embeddings(env, first_run):
    """Recompute single-caption retrieval by brute force from independently decoded and embedded clips."""
    res, out = first_run
    model = ViLLE.from_pretrained(str(env / "model"))
    clips = _clips(env)
    data = str(env / "data" / "test" / "shard-000000.tar")
    from ville.data import ClipStore

    store = ClipStore(data)
    frames = torch.stack([torch.from_numpy(decode_clip(store.read(k), FRAMES, size=32)[0]) for k, _ in clips])
    with torch.no_grad():
        direct = model.embed_video(frames).embeddings
    cache = E.Cache(str(out.parent / "cache"), model_identity(str(env / "model"))).load(f"test-{FRAMES}-videos-32px")
    V = torch.stack([cache[k]["emb"] for k, _ in clips]).double()
    torch.testing.assert_close(V.float(), direct, atol=1e-5, rtol=1e-4)
    texts = E.Cache(str(out.parent / "cache"), model_identity(str(env / "model"))).load("texts")
    T = torch.stack([texts[c["caption"]] for _, c in clips]).double()
    S = (T @ V.T).numpy()
    t2v = [1 + sum(S[i, j] >= S[i, i] for j in range(6) if j != i) for i in range(6)]
    v2t = [1 + sum(S[j, i] >= S[i, i] for j in range(6) if j != i) for i in range(6)]
    got = res["retrieval"]["single_caption"]
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        assert got[name]["R@1"] == pytest.approx(100 * np.mean(np.array(ranks) <= 1), abs=0.01)
        assert got[name]["R@5"] == pytest.approx(100 * np.mean(np.array(ranks) <= 5), abs=0.01)
        assert got[name]["MdR"] == pytest.approx(float(np.median(ranks)))


def _count_calls(model, names=("embed_video", "embed_text", "embed_composed", "generate", "match")):
    calls = {n: 0 for n in names}
    for n in names:
        fn = getattr(model, n)

        def wrapped(*a, _fn=fn, _n=n, **k):
            calls[_n] += 1
            return _fn(*a, **k)

        setattr(model, n, wrapped)
    return calls


def test_second_run_hits_the_cache(env, first_run):
    res, out = first_run
    model = ViLLE.from_pretrained(str(env / "model"))
    calls = _count_calls(model)
    again = E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")),
                       out=str(out.parent / "again.json"), **OPTS)
    assert calls == {n: 0 for n in calls}
    for section in E.TASKS:
        assert again[section] == {**res[section], **({"plot": again[section]["plot"]} if "plot" in res[section]
                                                     else {})}, section
    # A model with other weights has another identity: nothing cached applies to it.
    other = tiny_model(1)
    calls = _count_calls(other)
    E.evaluate(other, str(env / "data"), tasks=["retrieval"], out=str(out.parent / "other.json"), **OPTS)
    assert calls["embed_video"] > 0 and calls["embed_text"] > 0


def test_rerank_fusion_and_moment_scoring(env, first_run):
    """rerank_fusion=W orders the top k by scale * cosine + W * logit(p): W = 0 keeps stage 1's order, a huge W gives
    the probability-only order; moment_score='zscale' rescores the cached windows; no model call, the choices in
    the output."""
    res, out = first_run
    model = ViLLE.from_pretrained(str(env / "model"))
    calls = _count_calls(model)
    runs = {w: E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")), tasks=["rerank"],
                          out=str(out.parent / f"fusion{w:g}.json"), rerank_fusion=w, **OPTS)["rerank"]
            for w in (0.0, 1e9)}
    assert calls == {n: 0 for n in calls}
    assert runs[0.0]["stage2"] == res["rerank"]["stage1"] and runs[0.0]["fusion_weight"] == 0.0
    assert runs[1e9]["stage2"] == res["rerank"]["stage2"] and "logit(matching probability)" in runs[1e9]["protocol"]
    assert res["rerank"]["fusion_weight"] is None
    z = E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")), tasks=["moment"],
                   out=str(out.parent / "zscale.json"), moment_score="zscale", **OPTS)["moment"]
    assert calls == {n: 0 for n in calls}  # window embeddings cached too
    assert "same length" in z["protocol"] and z["random_window"] == res["moment"]["random_window"]
    # Windows are cached one by one: a subset of the scales needs no model call, a new scale embeds only its windows.
    sub = E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")), tasks=["moment"],
                     out=str(out.parent / "sub.json"), **{**OPTS, "moment_scales": (0.5,)})["moment"]
    assert calls == {n: 0 for n in calls} and sub["windows_per_clip"] < res["moment"]["windows_per_clip"]
    assert "[0.5]" in sub["protocol"] and sub["random_window"] != res["moment"]["random_window"]
    rows = []
    real = model.embed_video
    model.embed_video = lambda frames, **k: rows.append(k["features"].shape[0]) or real(frames, **k)
    more = E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")), tasks=["moment"],
                      out=str(out.parent / "more.json"), **{**OPTS, "moment_scales": (0.25, 0.5, 1.0)})["moment"]
    clips = more["num_clips"]
    assert sum(rows) == round((more["windows_per_clip"] - res["moment"]["windows_per_clip"]) * clips)
    with pytest.raises(ValueError, match="moment_score.*'zscale'"):
        E.evaluate(model, str(env / "data"), tasks=["moment"], moment_score="z", **OPTS)
    with pytest.raises(ValueError, match="window_batch_size: expected >= 1, got 0"):
        E.evaluate(model, str(env / "data"), tasks=["moment"], window_batch_size=0, **OPTS)


def test_cli_compositional_split_with_dual_softmax(env, capsys):
    out = env / "cli" / "comp.json"
    out.parent.mkdir()
    E.main([str(env / "model"), "--data", str(env / "data"), "--split", "compositional", "--tasks", "retrieval",
            "adaptive", "--max-clips", "3", "--dual-softmax", "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert res["meta"]["split"] == "compositional" and res["meta"]["counts"]["clips"] == 3
    assert set(res) == {"retrieval", "adaptive", "meta"}
    dsl = res["retrieval"]["single_caption_dual_softmax"]
    assert "DUAL-SOFTMAX" in dsl["protocol"] and dsl["t2v"]["n"] == 3
    assert os.path.isfile(out.parent / "adaptive_tokens_compositional.png")
    printed = capsys.readouterr().out
    assert "single_caption_dual_softmax" in printed and "chance" in printed


def _worker(rank, world, init, model_dir, data_dir, out, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = E.evaluate(model_dir, data_dir, tasks=["retrieval", "long_text"], out=out, **{**OPTS, "batch_size": 2})
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(env):
    model_dir, data_dir = str(env / "model"), str(env / "data")
    single = E.evaluate(model_dir, data_dir, tasks=["retrieval", "long_text"], out=str(env / "one" / "r.json"),
                        **{**OPTS, "batch_size": 2})
    # fork: the children reuse the imported modules (a spawned interpreter would re-import torch + transformers).
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    os.makedirs(env / "two")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(env / "two" / "init"), model_dir, data_dir,
                                               str(env / "two" / "r.json"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got[1] is None
    two = got[0]
    assert two["meta"]["world_size"] == 2
    assert two["retrieval"] == single["retrieval"] and two["long_text"] == single["long_text"]
    ident = model_identity(model_dir)
    a = E.Cache(str(env / "one" / "cache"), ident).load(f"test-{FRAMES}-videos-32px")
    b = E.Cache(str(env / "two" / "cache"), ident).load(f"test-{FRAMES}-videos-32px")
    assert set(a) == set(b) and len(a) == 6
    for k in a:  # to rounding, not bits: how many embedding steps share a forward follows each process's earlier
        # calls (`ViLLE._stop_history`), and a chunked forward rounds differently from one step at a time
        torch.testing.assert_close(a[k]["emb"], b[k]["emb"], rtol=1e-5, atol=1e-6)
        assert a[k]["tokens"] == b[k]["tokens"]


def test_all_captions_protocol(env, tmp_path):
    """Multi-caption clips: the all-captions protocol (every caption a query; V2T at the best caption) beside the
    single-caption one, both checked against brute-force ranks from the cached embeddings."""
    import io
    import tarfile

    src = env / "data" / "test" / "shard-000000.tar"
    (tmp_path / "multi" / "test").mkdir(parents=True)
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "multi" / "test" / "shard-000000.tar", "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["captions"] = [meta["caption"]] + [e["text"] for e in meta["events"][:2]]
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    out = tmp_path / "r.json"
    res = E.evaluate(str(env / "model"), str(tmp_path / "multi"), tasks=["retrieval", "composed"], out=str(out),
                     **OPTS)
    # No composed/ folder in this dataset: the section says so instead of failing the run.
    assert res["composed"]["num_queries"] == 0 and "not available" in res["composed"]["protocol"]
    assert "all_captions" in E.format_table(res)
    clips = _clips(env)
    pairs = [(i, c) for i, (_, m) in enumerate(clips) for c in [m["caption"]] + [e["text"] for e in m["events"][:2]]]
    r = res["retrieval"]
    assert r["all_captions"]["num_texts"] == len(pairs) > 6 and r["single_caption"]["num_texts"] == 6
    assert "every caption" in r["all_captions"]["protocol"]
    ident = model_identity(str(env / "model"))
    videos = E.Cache(str(tmp_path / "cache"), ident).load(f"test-{FRAMES}-videos-32px")
    texts = E.Cache(str(tmp_path / "cache"), ident).load("texts")
    V = torch.stack([videos[k]["emb"] for k, _ in clips]).double()
    S = (torch.stack([texts[c] for _, c in pairs]).double() @ V.T).numpy()  # (texts, videos)
    owner = np.array([i for i, _ in pairs])
    t2v = [1 + sum(S[t, j] >= S[t, owner[t]] for j in range(6) if j != owner[t]) for t in range(len(pairs))]
    v2t = []
    for v in range(6):
        best = S[owner == v, v].max()
        v2t.append(1 + sum(S[t, v] >= best for t in range(len(pairs)) if owner[t] != v))
    video_max = [1 + sum(S[owner == j, v].max() >= S[owner == v, v].max() for j in range(6) if j != v)
                 for v in range(6)]  # CLIP4Clip: each video's captions reduced to their maximum score
    for name, ranks in (("t2v", t2v), ("v2t", v2t), ("v2t_video_max", video_max)):
        assert r["all_captions"][name]["R@1"] == pytest.approx(100 * np.mean(np.array(ranks) <= 1), abs=0.01)
        assert r["all_captions"][name]["MnR"] == pytest.approx(np.mean(ranks), abs=0.01)
    # V2T chance at k=1 with m correct captions among n texts: 1 - C(n-m, 1) / C(n, 1) = m / n, averaged.
    m = np.bincount(owner)
    assert r["all_captions"]["chance"]["v2t"]["R@1"] == pytest.approx(100 * np.mean(m / len(pairs)), abs=0.01)


def test_window_features_share_frames(env):
    """The moment eval runs the tower once per distinct frame of a video's windows (_window_features): the same
    features, and so the same window embeddings, as running it on every window's frames."""
    from ville.data import ClipStore
    from ville.eval.moments import _window_features
    from ville.video import decode_windows, sliding_windows

    model = tiny_model(0)
    key, meta = _clips(env)[0]
    windows = sliding_windows(float(meta["duration"]), (0.1, 0.2, 0.5), 0.5)
    frames = decode_windows(ClipStore(str(env / "data" / "test" / "shard-000000.tar")).read(key), windows, FRAMES)[0]
    W = len(windows)
    assert len(np.unique(frames.reshape(W * FRAMES, -1), axis=0)) < W * FRAMES  # windows overlap
    with torch.no_grad():
        feats = _window_features(model, frames, chunk=5)
        direct = model.vision.frame_features(torch.from_numpy(frames))
        torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-5)
        a = model.embed_video(None, features=feats)
        b = model.embed_video(torch.from_numpy(frames))
    assert a.num_tokens.tolist() == b.num_tokens.tolist()
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)


def test_rerank_by_lm_score_against_a_direct_recomputation(env, first_run):
    """rerank_score='lm' (generative matching): with every clip in the top k and no fusion, stage 2 ranks each
    caption's clips by the caption's mean log-probability given the clip (model.target_logprob under the caption
    prompt) -- recomputed here clip by clip, ties pessimistic. No matching-head call; W = 0 keeps stage 1's order; a
    bad score name is one clear error."""
    from ville.data import CAPTION_PROMPT, ClipStore
    from ville.eval.common import single_caption

    res, out = first_run
    model = ViLLE.from_pretrained(str(env / "model"))
    calls = _count_calls(model, ("match", "target_logprob"))
    lm = {w: E.evaluate(model, str(env / "data"), identity=model_identity(str(env / "model")), tasks=["rerank"],
                        out=str(out.parent / f"lm{w}.json"), rerank_score="lm", rerank_fusion=w, **OPTS)["rerank"]
          for w in (None, 0.0)}
    assert calls["match"] == 0 and calls["target_logprob"] > 0
    clips = _clips(env)
    assert lm[None]["k"] >= len(clips) and lm[None]["score"] == "lm" and "target_logprob" in lm[None]["protocol"]
    assert lm[0.0]["stage2"] == res["rerank"]["stage1"] == lm[None]["stage1"]
    store = ClipStore(str(env / "data" / "test" / "shard-000000.tar"))
    frames = torch.from_numpy(np.stack([decode_clip(store.read(k), FRAMES, size=32)[0] for k, _ in clips]))
    queries = [(i, single_caption(m)) for i, (_, m) in enumerate(clips)]
    with torch.no_grad():
        scores = torch.stack([model.target_logprob(frames, [CAPTION_PROMPT] * len(clips), [text] * len(clips))
                              for _, text in queries])
        # texts of different lengths in one batch: padding does not change a score
        mixed = model.target_logprob(frames, [CAPTION_PROMPT] * len(clips), [text for _, text in queries])
    torch.testing.assert_close(mixed, scores.diagonal(), rtol=1e-4, atol=1e-5)
    positives = torch.zeros(scores.shape, dtype=torch.bool)
    positives[torch.arange(len(queries)), torch.tensor([i for i, _ in queries])] = True
    ranks = M.retrieval_ranks(scores, positives)
    for k in (1, 5):
        assert lm[None]["stage2"][f"R@{k}"] == pytest.approx(100.0 * float(np.mean(ranks <= k)), abs=0.01)
    with pytest.raises(ValueError, match="rerank_score: expected 'match' or 'lm', got 'nll'"):
        E.evaluate(model, str(env / "data"), tasks=["rerank"], rerank_score="nll", **OPTS)


def test_generate_and_match_take_precomputed_video_tokens(env):
    """QA and re-ranking run the tower once per clip and pass its tokens (`video=`) to generate / match: the same
    answers and probabilities as the plain calls on repeated frames, and no tower pass."""
    from ville.data import QA_PROMPT, ClipStore

    model = tiny_model(0)
    store = ClipStore(str(env / "data" / "test" / "shard-000000.tar"))
    frames = torch.from_numpy(np.stack([decode_clip(store.read(k), FRAMES, size=32)[0] for k, _ in _clips(env)[:2]]))
    sel = torch.tensor([0, 0, 1])
    prompts = [QA_PROMPT.format(question=q) for q in ("what moves?", "what color?", "how many?")]
    texts = ["a red ball", "two squares moving left", "a blue circle"]
    with torch.no_grad():
        plain = (model.generate(frames[sel], prompts, max_new_tokens=3), model.match(frames[sel], texts))
        tokens = model.video_tokens(frames)
        model.vision.forward = None  # a tower pass would fail
        given = (model.generate(None, prompts, max_new_tokens=3, video=tokens[sel]),
                 model.match(None, texts, video=tokens[sel]))
        del model.vision.forward
    assert given[0] == plain[0]
    torch.testing.assert_close(given[1], plain[1], rtol=1e-5, atol=1e-6)


def test_edited_stop_rule_never_reads_stale_cache(env, tmp_path):
    """The cache is keyed by weights and config: a copy of the model with only `embed.stop_threshold` edited in its
    config.yaml gets a new identity, and its evaluation embeds afresh (8 > 1 → every video takes the maximum)."""
    import shutil

    src, edited = str(env / "model"), str(tmp_path / "edited")
    shutil.copytree(src, edited)
    cfg_file = os.path.join(edited, "config.yaml")
    text = open(cfg_file).read()
    assert "stop_threshold: 0.5" in text
    open(cfg_file, "w").write(text.replace("stop_threshold: 0.5", "stop_threshold: 8.0"))
    assert model_identity(edited) != model_identity(src)
    assert E.state_identity(ViLLE.from_pretrained(edited)) != E.state_identity(ViLLE.from_pretrained(src))
    cache = str(tmp_path / "cache")
    base = E.evaluate(src, str(env / "data"), tasks=["adaptive"], cache_dir=cache, **OPTS)
    longest = E.evaluate(edited, str(env / "data"), tasks=["adaptive"], cache_dir=cache, **OPTS)
    assert longest["adaptive"]["mean_tokens"] == 6.0 != base["adaptive"]["mean_tokens"]


@pytest.mark.parametrize("tokens, title", [((3, 3, 3), "Spearman rho undefined (constant tokens)"),
                                           ((1, 3, 2), "Spearman rho = 0.50")], ids=["constant", "defined"])
def test_adaptive_plot_title(tmp_path, monkeypatch, tokens, title):
    """The plot's title never reads 'rho = None': an undefined rho says why, a defined one has 2 decimals."""
    import types

    import matplotlib.figure

    from ville.eval.adaptive import adaptive

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.append(fig.axes[0].get_title()))
    model = types.SimpleNamespace(cfg=tiny_cfg(), device=torch.device("cpu"))
    clips = [(f"c{i}", {"complexity": i + 1}) for i in range(len(tokens))]
    videos = {k: {"tokens": t, "ms": 1.0} for (k, _), t in zip(clips, tokens)}
    adaptive(model, clips, videos, str(tmp_path / "adaptive.png"), E.EvalCfg(num_frames=FRAMES))
    assert titles == [title]



def test_moments_use_the_moment_prompts(env, tmp_path):
    """With embed.moment_prompt / moment_text_prompt set, the moment section embeds each window after the moment
    prompt and each query after the moment text prompt: its cached window and query embeddings equal
    model.embed_video(moment=True) / embed_text(moment=True) (and not the clip prompts' embeddings), and its R1 / mIoU
    equal a direct recomputation from those."""
    import glob

    from ville.data import ClipStore
    from ville.eval.common import Cache, events
    from ville.video import decode_windows, sliding_windows

    model = tiny_model(1)
    model.cfg.embed.moment_prompt = "Summarize the event in embeddings."
    model.cfg.embed.moment_text_prompt = "Summarize the event in one embedding."
    res = E.evaluate(model, str(env / "data"), tasks=["moment"], cache_dir=str(tmp_path), identity="mp",
                     **{**OPTS, "moment_scales": (0.5,)})["moment"]
    cache = Cache(str(tmp_path), "mp")
    [windows_file] = glob.glob(str(tmp_path / "mp-test-*-windows-*.safetensors"))
    cached = cache.load(os.path.basename(windows_file)[len("mp-"):-len(".safetensors")])
    queries = cache.load("moment-texts")
    store = ClipStore(str(env / "data" / "test" / "shard-000000.tar"))
    size = model.vision.cfg.overrides["img_size"]
    top1, gts = [], []
    for key, meta in _clips(env):
        windows = sliding_windows(float(meta["duration"]), (0.5,), 0.5)
        np.testing.assert_allclose(cached[key]["windows"], windows, atol=1e-6)
        frames = torch.from_numpy(decode_windows(store.read(key), windows, FRAMES, size=size)[0])
        with torch.no_grad():
            emb = model.embed_video(frames, moment=True).embeddings.float()
            clip_prompt = model.embed_video(frames).embeddings.float()
            torch.testing.assert_close(cached[key]["emb"], emb, rtol=1e-4, atol=1e-5)
            assert (cached[key]["emb"] - clip_prompt).abs().max() > 1e-3
            for ev in events(meta):
                text = model.embed_text([ev["text"]], moment=True)[0].float()
                torch.testing.assert_close(queries[ev["text"]], text, rtol=1e-4, atol=1e-5)
                assert (queries[ev["text"]] - model.embed_text([ev["text"]])[0]).abs().max() > 1e-3
                top1.append(windows[int((emb.double() @ text.double()).argmax())])
                gts.append(np.array([[ev["start"], ev["end"]]]))
    direct = {k: round(v, 2) for k, v in M.moment_r1(np.array(top1), gts).items()}
    assert {k: res[k] for k in direct} == direct
