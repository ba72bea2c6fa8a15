"""ville.index + ville.search: the command-line round trip, the model-identity check, folder sources, exact top-k,
incremental updates (changed, new and removed files; another model re-embeds everything), an interrupted update
leaving the old index intact, and one error line when nothing is indexable."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from ville import ViLLE
from ville import index as I
from ville import search as S
from ville.checkpoint import model_identity
from ville.data import read_shard_index
from ville.head import HeadCfg
from ville.llm import LLMCfg
from ville.model import EmbedCfg, ModelCfg
from ville.vision import VisionCfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_cfg() -> ModelCfg:
    llm = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
    return ModelCfg(
        vision=VisionCfg(name="vit_base_patch16_siglip_224", pretrained=False, max_frames=4,
                         overrides=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)),
        llm=LLMCfg(pretrained=False, tokenizer="builtin", config=copy.deepcopy(llm)),
        head=HeadCfg(num_pool_tokens=8, width=32, num_heads=4, mlp_ratio=2.0, dim=24),
        embed=EmbedCfg(max_embed_tokens=6, min_embed_tokens=1, stop_threshold=0.5))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from data_tools import synth

    root = tmp_path_factory.mktemp("search")
    synth.generate(root / "data", seed=5, counts={"test": 5}, shard_size=3, progress=False)  # two shards
    for seed, name in ((0, "model_a"), (1, "model_b")):
        torch.manual_seed(seed)
        ViLLE(tiny_cfg()).save_pretrained(str(root / name))
    # The same clips as loose mp4 files (one in a sub-folder), plus one that is not a video.
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    with tarfile.open(root / "data" / "test" / "shard-000000.tar") as tar:
        for i, m in enumerate(x for x in tar.getmembers() if x.name.endswith(".mp4")):
            dest = videos / ("sub" if i == 0 else "") / m.name
            dest.write_bytes(tar.extractfile(m).read())
    (videos / "broken.mp4").write_bytes(b"not a video")
    return root


def _start(*args) -> subprocess.Popen:
    envvars = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=envvars)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _keys(env):
    shards = [str(env / "data" / "test" / f"shard-{n}.tar") for n in ("000000", "000001")]
    return [s.key for shard in shards for s in read_shard_index(shard)]


def test_cli_round_trip_and_model_mismatch(env):
    index_path = env / "shards.idx"
    r = _finish(_start("ville.index", str(env / "model_a"), str(env / "data" / "test" / "shard-*.tar"), "--out",
                       str(index_path), "--num-frames", "2", "--batch-size", "2", "--no-progress"))
    assert r.returncode == 0, r.stderr
    index = I.load_index(str(index_path))
    keys = _keys(env)
    assert index["ids"] == keys and index["embeddings"].shape == (5, 24) and index["num_frames"] == 2
    assert index["model_identity"] == model_identity(str(env / "model_a"))
    assert [s["key"] for s in index["sources"]] == keys and all(os.path.isfile(s["shard"]) for s in index["sources"])
    assert np.allclose(np.linalg.norm(index["embeddings"], axis=1), 1, atol=1e-5)

    metas = {s.key: s.meta for n in ("000000", "000001")
             for s in read_shard_index(str(env / "data" / "test" / f"shard-{n}.tar"))}
    query = metas[keys[2]]["caption"]
    # Both searches at once: each start pays the interpreter + torch/transformers import.
    search = _start("ville.search", str(index_path), query, "-k", "3", "--rerank", "--rerank-k", "4", "--json")
    mismatch = _start("ville.search", str(index_path), query, "--model", str(env / "model_b"))
    r, bad = _finish(search), _finish(mismatch)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    model = ViLLE.from_pretrained(str(env / "model_a"))
    with torch.no_grad():
        cos = index["embeddings"] @ model.embed_text([query])[0].numpy()
    top4 = {keys[i] for i in np.argsort(-cos, kind="stable")[:4]}
    assert [h["rank"] for h in hits] == [1, 2, 3] and {h["id"] for h in hits} <= top4
    assert all(0 <= h["match"] <= 1 for h in hits)
    assert [h["match"] for h in hits] == sorted((h["match"] for h in hits), reverse=True)
    for h in hits:
        assert h["score"] == pytest.approx(float(cos[keys.index(h["id"])]), abs=1e-4)

    assert bad.returncode == 2 and bad.stdout == ""
    assert "model mismatch" in bad.stderr and model_identity(str(env / "model_b")) in bad.stderr


def test_folder_index_and_search_in_process(env, capsys):
    model = ViLLE.from_pretrained(str(env / "model_a"))
    index = I.build_index(model, [str(env / "videos")], identity=model_identity(str(env / "model_a")),
                          model_dir=str(env / "model_a"), num_frames=2, batch_size=2, progress=False)
    keys = _keys(env)[:3]
    assert index["ids"] == sorted([f"sub/{keys[0]}.mp4", f"{keys[1]}.mp4", f"{keys[2]}.mp4"])
    assert [s["path"] for s in index["skipped"]] == [str(env / "videos" / "broken.mp4")]
    with pytest.raises(ValueError, match="duplicate id"):
        I.build_index(model, [str(env / "videos")] * 2, identity="x", num_frames=2, progress=False)

    hits = S.search(index, model, "a red circle moves left", k=2)
    with torch.no_grad():
        cos = torch.from_numpy(index["embeddings"]) @ model.embed_text(["a red circle moves left"])[0]
    best = torch.sort(cos, descending=True, stable=True).indices[:2].tolist()
    assert [h["id"] for h in hits] == [index["ids"][i] for i in best]
    reranked = S.search(index, model, "a red circle moves left", k=3, rerank=True)
    assert sorted(h["id"] for h in reranked) == sorted(index["ids"]) and all("match" in h for h in reranked)
    # Generative matching: the query's log-probability as each video's caption, recomputed here; W = 0 keeps the
    # embedding order; a huge W gives the score's own order.
    by_lm = S.search(index, model, "a red circle moves left", k=3, rerank=True, rerank_score="lm")
    with torch.no_grad():
        clips = torch.stack([S._frames(src, index["num_frames"], index["frame_size"], {}) for src in index["sources"]])
        lm = model.target_logprob(clips, ["Describe the video briefly."] * 3, ["a red circle moves left"] * 3)
    assert [h["id"] for h in by_lm] == [index["ids"][i] for i in torch.sort(lm, descending=True, stable=True).indices]
    torch.testing.assert_close(torch.tensor([h["lm"] for h in by_lm]), lm.sort(descending=True).values,
                               rtol=1e-4, atol=1e-5)
    kept = S.search(index, model, "a red circle moves left", k=3, rerank=True, rerank_score="lm", rerank_fusion=0.0)
    assert [h["id"] for h in kept] == [index["ids"][i] for i in torch.sort(cos, descending=True, stable=True).indices]
    huge = S.search(index, model, "a red circle moves left", k=3, rerank=True, rerank_score="lm", rerank_fusion=1e9)
    assert [h["id"] for h in huge] == [h["id"] for h in by_lm]
    with pytest.raises(ValueError, match="rerank_score: expected 'match' or 'lm', got 'x'"):
        S.search(index, model, "a red circle moves left", rerank=True, rerank_score="x")

    path = env / "folder.idx"
    I.save_index(index, str(path))
    S.main([str(path), "a red circle moves left", "-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and lines[0].split()[-1] == hits[0]["id"]


def test_topk_exact_with_ties():
    emb = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    emb[7] = emb[3]  # an exact tie: the lower index comes first
    q = emb[3].clone()
    scores, idx = S.topk(emb, q, 5, use_faiss=False)
    expected = np.argsort(-(emb @ q).numpy(), kind="stable")[:5]
    assert idx.tolist() == expected.tolist() and idx[:2].tolist() == [3, 7]
    assert torch.all(scores[:-1] >= scores[1:])
    assert S.topk(emb, q, 100, use_faiss=False)[1].numel() == 50


def test_topk_faiss_agrees():
    pytest.importorskip("faiss")
    emb = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    q = emb[11]
    a, ia = S.topk(emb, q, 10, use_faiss=False)
    b, ib = S.topk(emb, q, 10, use_faiss=True)
    assert ia.tolist() == ib.tolist() and torch.allclose(a, b, atol=1e-5)


def test_identity_check_and_bad_index(tmp_path):
    with pytest.raises(S.ModelMismatchError, match="model mismatch"):
        S.check_identity({"model_identity": "aaaa", "model_dir": "/x"}, "bbbb", "/y")
    S.check_identity({"model_identity": "aaaa"}, "aaaa", "/y")
    torch.save({"format": "something else"}, tmp_path / "bad.idx")  # an old-format (pickle) file
    with pytest.raises(ValueError, match="refused.*Re-create it"):
        I.load_index(str(tmp_path / "bad.idx"))


def _copy_videos(env, dest):
    import shutil

    shutil.copytree(env / "videos", dest)
    os.remove(dest / "broken.mp4")
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*.mp4"))


def test_incremental_update(env, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    ids = _copy_videos(env, videos)
    model = ViLLE.from_pretrained(str(env / "model_a"))
    ident = model_identity(str(env / "model_a"))
    kw = dict(identity=ident, num_frames=2, batch_size=2, progress=False)
    first = I.build_index(model, [str(videos)], **kw)
    assert first["ids"] == ids and first["stats"] == {"embedded": 3, "kept": 0, "dropped": 0}
    path = tmp_path / "v.idx"
    I.save_index(first, str(path))

    embedded = []
    embed = I._embed
    monkeypatch.setattr(I, "_embed", lambda m, frames: (embedded.append(len(frames)), embed(m, frames))[1])
    changed, removed = videos / ids[0], videos / ids[1]
    os.utime(changed, ns=(1, 1))  # same bytes, another mtime: embedded again
    os.rename(removed, videos / "new.mp4")  # one file gone, one new
    update = I.build_index(model, [str(videos)], previous=I.load_index(str(path)), **kw)
    assert sum(embedded) == 2 and update["stats"] == {"embedded": 2, "kept": 1, "dropped": 2}
    assert update["ids"] == sorted([ids[0], ids[2], "new.mp4"])
    fresh = I.build_index(model, [str(videos)], **kw)
    assert update["ids"] == fresh["ids"] and np.allclose(update["embeddings"], fresh["embeddings"], atol=1e-5)
    kept = update["ids"].index(ids[2])
    assert np.array_equal(update["embeddings"][kept], first["embeddings"][first["ids"].index(ids[2])])

    # Another model: nothing of the old index is kept, whatever the files.
    embedded.clear()
    other = ViLLE.from_pretrained(str(env / "model_b"))
    redo = I.build_index(other, [str(videos)], previous=update, **{**kw, "identity": "other"})
    assert sum(embedded) == 3 and redo["stats"]["kept"] == 0 and redo["model_identity"] == "other"


def test_interrupted_update_leaves_the_old_index(env, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    _copy_videos(env, videos)
    path = tmp_path / "v.idx"
    args = [str(env / "model_a"), str(videos), "--out", str(path), "--num-frames", "2", "--no-progress"]
    I.main(args)
    before = path.read_bytes()
    for f in videos.rglob("*.mp4"):
        os.utime(f, ns=(1, 1))  # everything changed: the update must decode again

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(I, "decode_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        I.main(args)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["v.idx", "videos"]


def test_nothing_indexable_is_one_error_line(env, tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.mp4").write_bytes(b"not a video")
    (tmp_path / "empty").mkdir()
    for folder, why in (("broken", "all 1 videos were skipped"), ("empty", "no .mp4 file there")):
        with pytest.raises(SystemExit) as e:
            I.main([str(env / "model_a"), str(tmp_path / folder), "--out", str(tmp_path / "x.idx"), "--no-progress"])
        assert e.value.code == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and why in err[0] and str(tmp_path / folder) in err[0]
    assert not (tmp_path / "x.idx").exists()
