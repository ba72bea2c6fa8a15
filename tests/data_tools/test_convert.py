"""Each converter on a tiny fixture in its dataset's real annotation format, with generated videos and one video
left out on purpose (it must be reported, never dropped silently)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_tools import convert
from data_tools.shards import decode_mp4, encode_mp4, read_tar


def _video(path: Path, frames: int = 4, fps: float = 4, size=(32, 48)) -> np.ndarray:
    """A tiny mp4 whose frames encode its name (so a test can tell the files apart after conversion)."""
    seed = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16)
    clip = np.random.default_rng(seed).integers(0, 255, (frames, 1, 1, 3)).astype(np.uint8)
    clip = np.ascontiguousarray(np.broadcast_to(clip, (frames, *size, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(clip, fps))
    return clip


def _webm(path: Path, frames: int = 5) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=5)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 40 * i, np.uint8), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode())


def _read(out: Path, split: str) -> dict[str, dict]:
    samples = {}
    for shard in sorted((out / split).glob("shard-*.tar")):
        for key, members in read_tar(shard):
            samples[key] = members
    return samples


def _convert(fmt, annotations, videos, out, missing: int, **kw) -> list[dict]:
    kw.setdefault("workers", 1)
    if missing:
        with pytest.warns(UserWarning, match=f"{missing} of .* not found"):
            metas = convert.convert(fmt, annotations, videos, out, progress=False, **kw)
    else:
        metas = convert.convert(fmt, annotations, videos, out, progress=False, **kw)
    return metas


def _json(sample) -> dict:
    return json.loads(sample["json"])


def _check_events(meta: dict) -> None:
    for ev in meta["events"]:
        assert 0 <= ev["start"] <= ev["end"]
        if "duration" in meta:
            assert ev["end"] <= meta["duration"] + 1e-6


# ---------------------------------------------------------------------------------------------------------- MSR-VTT
@pytest.fixture
def msrvtt(tmp_path):
    videos = tmp_path / "videos"
    for v in ("video0", "video1", "video7010"):
        _video(videos / f"{v}.mp4")
    data = {
        "info": {"year": "2016"},
        "videos": [{"category": 9, "url": "https://www.youtube.com/watch?v=x", "video_id": "video0",
                    "start time": 137.72, "end time": 149.44, "split": "train", "id": 0},
                   {"category": 16, "url": "u", "video_id": "video1", "start time": 0, "end time": 10,
                    "split": "train", "id": 1},
                   {"category": 3, "url": "u", "video_id": "video5", "start time": 0, "end time": 10,
                    "split": "validate", "id": 5},
                   {"category": 2, "url": "u", "video_id": "video7010", "start time": 0, "end time": 10,
                    "split": "test", "id": 7010}],
        "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
                      {"caption": "a man drives a car", "video_id": "video1", "sen_id": 1},
                      {"caption": "a red car on a road", "video_id": "video0", "sen_id": 2},
                      {"caption": "people dance on a stage", "video_id": "video7010", "sen_id": 3},
                      {"caption": "a group dancing", "video_id": "video7010", "sen_id": 4},
                      {"caption": "a cat plays", "video_id": "video5", "sen_id": 5}],
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo5\n")
    # The 1k-A csv as released: pandas' unnamed index column first.
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        ",key,vid_key,video_id,sentence\n0,ret0,msr7010,video7010,a group of people dancing on stage\n")
    return tmp_path, videos


def test_msrvtt_9k_train_with_missing_video(msrvtt, tmp_path):
    root, videos = msrvtt
    out = tmp_path / "out"
    (meta,) = _convert("msrvtt", root / "MSRVTT_data.json", videos, out, missing=1,
                       split_csv=root / "MSRVTT_train.9k.csv")
    assert meta["split"] == "train" and meta["count"] == 2 and meta["missing"] == 1
    assert (out / "train" / "missing.txt").read_text() == "video5\n"
    samples = _read(out, "train")
    assert sorted(samples) == ["video0", "video1"]
    m = _json(samples["video0"])
    assert m["captions"] == ["a car is shown", "a red car on a road"] and m["caption"] == "a car is shown"
    assert m["video_id"] == "video0" and m["split"] == "train" and m["category"] == 9
    assert samples["video0"]["mp4"] == (videos / "video0.mp4").read_bytes()  # copied byte for byte
    assert decode_mp4(samples["video1"]["mp4"]).shape == (4, 32, 48, 3)


def test_msrvtt_1k_a_test_and_json_splits(msrvtt, tmp_path):
    root, videos = msrvtt
    (meta,) = _convert("msrvtt", root / "MSRVTT_data.json", videos, tmp_path / "a", missing=0,
                       split_csv=root / "MSRVTT_JSFUSION_test.csv")
    m = _json(_read(tmp_path / "a", "test")["video7010"])
    assert m["caption"] == "a group of people dancing on stage"
    assert m["captions"] == ["people dance on a stage", "a group dancing"]
    # Without a csv, each split of the json becomes a folder.
    metas = _convert("msrvtt", root / "MSRVTT_data.json", videos, tmp_path / "b", missing=1)
    assert {m["split"]: m["count"] for m in metas} == {"train": 2, "validate": 0, "test": 1}
    # The csv alone still works (no json): caption only.
    (meta,) = _convert("msrvtt", root / "MSRVTT_JSFUSION_test.csv", videos, tmp_path / "c", missing=0)
    assert _json(_read(tmp_path / "c", "test")["video7010"])["caption"] == "a group of people dancing on stage"


def _videodatainfo(split_videos: dict[str, str], sentences: list[tuple[str, str]]) -> dict:
    """The official MSR-VTT 2016 layout (train_val_videodatainfo.json / test_videodatainfo.json)."""
    return {"info": {"contributor": "Microsoft MSR-VTT", "year": "2016"},
            "videos": [{"category": 1, "url": "u", "video_id": v, "start time": 0.0, "end time": 10.0, "split": sp,
                        "id": int(v[5:])} for v, sp in split_videos.items()],
            "sentences": [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)]}


def test_msrvtt_official_jsons_1k_a_and_all_captions(tmp_path):
    """1k-A test videos are in the official test split: with train_val + test videodatainfo, `caption` is the
    JSFUSION csv sentence (labelled msrvtt_1k_a) and `captions` the test json's sentences; with train_val alone
    they keep only the csv sentence, and a warning says how to get the rest."""
    videos = tmp_path / "videos"
    for v in ("video0", "video7010", "video7020"):
        _video(videos / f"{v}.mp4")
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(_videodatainfo(
        {"video0": "train"}, [("video0", "a car is shown")])))
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(_videodatainfo(
        {"video7010": "test", "video7020": "test"},
        [("video7010", "people dance"), ("video7020", "a cat sleeps"), ("video7010", "a group dancing")])))
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        ",key,vid_key,video_id,sentence\n0,ret0,msr7010,video7010,a group dancing\n"
        "1,ret1,msr7020,video7020,a cat sleeps\n")
    both = [tmp_path / "train_val_videodatainfo.json", tmp_path / "test_videodatainfo.json"]
    argv = ["msrvtt", "--annotations", *map(str, both), "--split-csv", str(tmp_path / "MSRVTT_JSFUSION_test.csv"),
            "--videos", str(videos), "--out", str(tmp_path / "a"), "--workers", "1", "--no-progress"]
    (meta,) = convert.main(argv)
    m = _json(_read(tmp_path / "a", "test")["video7010"])
    assert (m["caption"], m["caption_source"]) == ("a group dancing", "msrvtt_1k_a")
    assert m["captions"] == ["people dance", "a group dancing"] and meta["annotations"] == list(map(str, both))
    with pytest.warns(UserWarning, match="2 of 2 .* no sentence .* test_videodatainfo.json"):
        convert.convert("msrvtt", both[:1], videos, tmp_path / "b", progress=False,
                        split_csv=tmp_path / "MSRVTT_JSFUSION_test.csv")
    m = _json(_read(tmp_path / "b", "test")["video7010"])
    assert m["caption"] == "a group dancing" and m["captions"] == ["a group dancing"]
    # The json's own splits: the first sentence, labelled.
    metas = _convert("msrvtt", both, videos, tmp_path / "c", missing=0)
    assert [x["split"] for x in metas] == ["train", "test"]
    assert _json(_read(tmp_path / "c", "train")["video0"])["caption_source"] == "first_caption"
    with pytest.raises(ValueError, match="didemo takes one --annotations file, got 2"):
        convert.convert("didemo", both, videos, tmp_path / "d")


def test_msrvtt_qa(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "video6513.mp4")
    items = [{"answer": "man", "category_id": 2, "id": 0, "question": "who is talking?", "video_id": 6513},
             {"answer": "car", "category_id": 0, "id": 1, "question": "what is shown?", "video_id": 6513},
             {"answer": "dog", "category_id": 0, "id": 2, "question": "what runs?", "video_id": 6514}]
    (tmp_path / "test_qa.json").write_text(json.dumps(items))
    (meta,) = _convert("msrvtt_qa", tmp_path / "test_qa.json", videos, tmp_path / "out", missing=1)
    assert meta["split"] == "test"
    m = _json(_read(tmp_path / "out", "test")["video6513"])
    assert [(q["question"], q["answer"], q["id"]) for q in m["qa"]] == [("who is talking?", "man", 0),
                                                                        ("what is shown?", "car", 1)]


# ------------------------------------------------------------------------------------------------- WebVid, CoVR
def test_webvid(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "000001_000050" / "1066692580.mp4")
    _video(videos / "21179416.mp4")  # flat layout also found
    rows = [["videoid", "contentUrl", "duration", "page_dir", "name"],
            ["1066692580", "https://ak.picdn.net/a.mp4", "PT00H00M11S", "000001_000050", "Aerial shot of a city"],
            ["21179416", "https://ak.picdn.net/b.mp4", "PT00H01M02.5S", "000001_000050", "Blue sky, clouds"],
            ["999", "https://ak.picdn.net/c.mp4", "PT00H00M05S", "000001_000050", "gone"]]
    with open(tmp_path / "results_2M_val.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (meta,) = _convert("webvid", tmp_path / "results_2M_val.csv", videos, tmp_path / "out", missing=1, split="val")
    samples = _read(tmp_path / "out", "val")
    assert sorted(samples) == ["1066692580", "21179416"]
    m = _json(samples["1066692580"])
    assert m["caption"] == "Aerial shot of a city" and m["duration"] == 11.0 and m["url"].endswith("a.mp4")
    assert _json(samples["21179416"])["duration"] == 62.5
    assert (tmp_path / "out" / "val" / "missing.txt").read_text() == "000001_000050/999\n"


def test_webvid_covr_triplets_and_gallery(tmp_path):
    videos = tmp_path / "videos"
    for p in ("1015/100", "1015/101", "1016/200"):
        _video(videos / f"{p}.mp4")
    rows = [["pth1", "pth2", "edit", "txt1", "txt2", "scores"],
            ["1015/100", "1015/101", "make it night", "a city by day", "a city by night", "0.9"],
            ["1016/200", "1015/101", "add a city", "an empty field", "a city by night", "0.8"],
            ["1015/100", "1017/300", "make it snow", "a city by day", "a snowy city", "0.7"]]
    with open(tmp_path / "webvid8m-covr_test.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    metas = _convert("webvid_covr", tmp_path / "webvid8m-covr_test.csv", videos, tmp_path / "out", missing=1,
                     split="test")
    assert [(m["split"], m["count"], m["missing"]) for m in metas] == [("test", 2, 1), ("test_gallery", 1, 1)]
    trips = _read(tmp_path / "out", "test")
    assert sorted(trips) == ["1015_100-1015_101", "1016_200-1015_101"]
    t = trips["1015_100-1015_101"]
    assert {"json", "src.mp4", "tgt.mp4"} == set(t)
    m = _json(t)
    assert (m["edit"], m["source_caption"], m["target_caption"]) == ("make it night", "a city by day",
                                                                     "a city by night")
    assert m["target_key"] == "1015_101" and m["extra"] == {"scores": "0.9"}
    assert t["src.mp4"] == (videos / "1015/100.mp4").read_bytes()
    assert t["tgt.mp4"] == (videos / "1015/101.mp4").read_bytes()
    gallery = _read(tmp_path / "out", "test_gallery")
    assert list(gallery) == ["1015_101"] and _json(gallery["1015_101"])["caption"] == "a city by night"
    assert (tmp_path / "out" / "test" / "missing.txt").read_text() == "1017/300\n"


# ---------------------------------------------------------------------------------------------- moment datasets
def test_didemo_segments_most_agreed_and_clipped(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "54445727@N00_2470306736_4b8c5b9e3b.mov", frames=12, fps=1)  # 12 s: segments 0..2 (+ part)
    items = [
        {"annotation_id": 1, "description": "a dog runs in", "video": "54445727@N00_2470306736_4b8c5b9e3b.mov",
         "times": [[0, 0], [0, 1], [0, 0], [1, 1]], "download_link": "x", "num_segments": 3},
        {"annotation_id": 2, "description": "the dog sits", "video": "54445727@N00_2470306736_4b8c5b9e3b.mov",
         "times": [[2, 2], [1, 2], [2, 3], [1, 2]], "download_link": "x", "num_segments": 3},
        {"annotation_id": 3, "description": "gone", "video": "missing_clip.mov", "times": [[0, 0]] * 4,
         "download_link": "x", "num_segments": 6}]
    (tmp_path / "test_data.json").write_text(json.dumps(items))
    (meta,) = _convert("didemo", tmp_path / "test_data.json", videos, tmp_path / "out", missing=1)
    assert meta["split"] == "test"
    samples = _read(tmp_path / "out", "test")
    (key,) = samples
    assert key == "54445727_N00_2470306736_4b8c5b9e3b"
    m = _json(samples[key])
    assert m["video_id"] == "54445727@N00_2470306736_4b8c5b9e3b.mov"
    assert m["duration"] == pytest.approx(12.0)
    assert [(e["start"], e["end"], e["text"]) for e in m["events"]] == [(0.0, 5.0, "a dog runs in"),
                                                                         (5.0, 12.0, "the dog sits")]
    assert m["events"][1]["windows"] == [[10.0, 12.0], [5.0, 12.0], [10.0, 12.0], [5.0, 12.0]]
    assert m["caption"] == "a dog runs in the dog sits" and m["captions"] == ["a dog runs in", "the dog sits"]
    _check_events(m)
    # .mov is the mp4 family: stored as .mp4, byte for byte.
    assert samples[key]["mp4"] == (videos / "54445727@N00_2470306736_4b8c5b9e3b.mov").read_bytes()


def test_didemo_stem_matching_and_30s_cap(tmp_path):
    """The release names videos with .wmv, .mts, .3g2, .m2ts and a bare '.' (38 of 1,094 val, 78 of 1,037 test
    videos); re-encoded copies are `<stem>.mp4`. A video longer than the annotated 30 s gets duration 30."""
    videos = tmp_path / "videos"
    names = ["1@N00_1_a.wmv", "2@N01_2_b.mts", "3@N02_3_c.3g2", "4@N03_4_d.m2ts", "5@N04_5_e."]
    for n in names:
        _video(videos / (n.rsplit(".", 1)[0] + ".mp4"), frames=4, fps=1)
    _video(videos / "6@N05_6_f.mp4", frames=36, fps=1)  # 36 s on disk
    items = [{"annotation_id": i, "description": f"thing {i}", "video": n, "times": [[0, 0]] * 4, "dl_link": "x",
              "num_segments": 1} for i, n in enumerate(names)]
    items.append({"annotation_id": 9, "description": "the end", "video": "6@N05_6_f.avi",
                  "times": [[5, 5], [4, 5], [5, 5], [5, 5]], "dl_link": "x", "num_segments": 6})
    (tmp_path / "val_data.json").write_text(json.dumps(items))
    (meta,) = _convert("didemo", tmp_path / "val_data.json", videos, tmp_path / "out", missing=0)
    samples = _read(tmp_path / "out", "val")
    assert meta["count"] == 6 and sorted(samples) == ["1_N00_1_a", "2_N01_2_b", "3_N02_3_c", "4_N03_4_d",
                                                      "5_N04_5_e", "6_N05_6_f"]
    assert _json(samples["5_N04_5_e"])["video_id"] == "5@N04_5_e."
    m = _json(samples["6_N05_6_f"])
    assert m["duration"] == 30.0 and m["duration_capped"] is True
    ev = m["events"][0]
    assert (ev["start"], ev["end"]) == (25.0, 30.0) and ev["windows"][1] == [20.0, 30.0]
    assert ev["times"] == [[5, 5], [4, 5], [5, 5], [5, 5]]  # as released, for DiDeMo's own rule
    assert m["caption_source"] == "paragraph" and "duration_capped" not in _json(samples["1_N00_1_a"])


def test_activitynet(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "QOlSCBRmfWY.mp4")  # on disk without the "v_" prefix
    ann = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [90.0, 56.26]],
                             "sentences": ["A young woman is seen standing.", " She then begins dancing.",
                                           "She ends by bowing."]},
           "v_missing": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": ["x"]}}
    (tmp_path / "val_1.json").write_text(json.dumps(ann))
    (meta,) = _convert("activitynet", tmp_path / "val_1.json", videos, tmp_path / "out", missing=1)
    m = _json(_read(tmp_path / "out", "val_1")["v_QOlSCBRmfWY"])
    assert m["duration"] == 82.73
    # A reversed pair is swapped and clipped to the duration.
    assert [(e["start"], e["end"]) for e in m["events"]] == [(0.83, 19.86), (17.37, 60.81), (56.26, 82.73)]
    assert m["events"][1]["text"] == "She then begins dancing."
    assert m["caption"] == "A young woman is seen standing. She then begins dancing. She ends by bowing."
    _check_events(m)


def test_charades_sta(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "AO8RW.mp4", frames=8, fps=1)
    _video(videos / "Y6R7T.mp4", frames=6, fps=1)
    (tmp_path / "charades_sta_test.txt").write_text(
        "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
        "Y6R7T 1.2 9.5##person opens the door.\n"
        "AO8RW 2.5 7.0##person takes a book.\n"
        "ZZZZZ 1.0 2.0##nobody.\n")
    (meta,) = _convert("charades_sta", tmp_path / "charades_sta_test.txt", videos, tmp_path / "out", missing=1)
    samples = _read(tmp_path / "out", "test")
    assert sorted(samples) == ["AO8RW", "Y6R7T"]
    m = _json(samples["AO8RW"])
    assert m["duration"] == pytest.approx(8.0)
    assert [(e["start"], e["end"], e["text"]) for e in m["events"]] == [
        (0.0, 6.9, "a person is putting a book on a shelf."), (2.5, 7.0, "person takes a book.")]
    m = _json(samples["Y6R7T"])
    assert m["events"][0]["end"] == pytest.approx(6.0)  # annotation past the video's end is clipped
    _check_events(m)


def test_qvhighlights(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "NUWOCrpWNTk_360.0_510.0.mp4")
    _video(videos / "j7rJstUseKg_360.0_510.0.mp4")
    lines = [{"qid": 9769, "query": "some military patriots takes us through their safety procedures",
              "duration": 150, "vid": "NUWOCrpWNTk_360.0_510.0", "relevant_clip_ids": [27, 28, 29],
              "saliency_scores": [[4, 4, 2], [3, 4, 2], [2, 2, 3]], "relevant_windows": [[54, 60], [72, 80]]},
             {"qid": 5000, "query": "a man talks", "duration": 150, "vid": "NUWOCrpWNTk_360.0_510.0",
              "relevant_clip_ids": [1], "saliency_scores": [[1, 1, 1]], "relevant_windows": [[2, 4]]},
             {"qid": 2579, "query": "a girl and her mother cooked", "duration": 150,
              "vid": "j7rJstUseKg_360.0_510.0"},
             {"qid": 1, "query": "gone", "duration": 150, "vid": "abc_0.0_150.0", "relevant_windows": [[0, 2]]}]
    (tmp_path / "highlight_val_release.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (meta,) = _convert("qvhighlights", tmp_path / "highlight_val_release.jsonl", videos, tmp_path / "out",
                       missing=1)
    assert meta["split"] == "val"
    samples = _read(tmp_path / "out", "val")
    assert sorted(samples) == ["NUWOCrpWNTk_360_0_510_0", "j7rJstUseKg_360_0_510_0"]
    m = _json(samples["NUWOCrpWNTk_360_0_510_0"])
    assert m["video_id"] == "NUWOCrpWNTk_360.0_510.0" and m["duration"] == 150
    e = m["events"][0]
    assert (e["start"], e["end"], e["qid"], e["windows"]) == (54, 60, 9769, [[54, 60], [72, 80]])
    assert e["saliency_scores"][0] == [4, 4, 2] and e["relevant_clip_ids"] == [27, 28, 29]
    assert [x["qid"] for x in m["events"]] == [9769, 5000]
    m = _json(samples["j7rJstUseKg_360_0_510_0"])
    assert "events" not in m and m["queries"] == [{"qid": 2579, "text": "a girl and her mother cooked"}]


# ---------------------------------------------------------------------------------- long captions, transcoding, CLI
def test_longcap_transcodes_other_containers(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "clip_a.mp4")
    _webm(videos / "clip_b.webm")
    items = [{"video": "clip_a.mp4", "caption": "A long description. It goes on."},
             {"video": "clip_b.webm", "caption": " Another detailed caption. "},
             {"video": "clip_c.mp4", "caption": "missing"}]
    (tmp_path / "long.json").write_text(json.dumps(items))
    (meta,) = _convert("longcap", tmp_path / "long.json", videos, tmp_path / "out", missing=1)
    samples = _read(tmp_path / "out", "train")
    a, b = _json(samples["clip_a"]), _json(samples["clip_b"])
    assert a["detailed_caption"] == "A long description. It goes on." and "caption" not in a
    assert b["detailed_caption"] == "Another detailed caption." and b["transcoded"] is True
    frames = decode_mp4(samples["clip_b"]["mp4"])
    assert frames.shape == (5, 24, 32, 3)
    assert abs(int(frames[3].mean()) - 120) < 8
    # --keep-container stores the webm untouched under its own extension.
    _convert("longcap", tmp_path / "long.json", videos, tmp_path / "kept", missing=1, keep_container=True)
    kept = _read(tmp_path / "kept", "train")["clip_b"]
    assert kept["webm"] == (videos / "clip_b.webm").read_bytes() and _json(kept)["video_ext"] == "webm"


def test_parallel_shards_cli_and_determinism(tmp_path):
    videos = tmp_path / "videos"
    names = [f"v{i}" for i in range(5)]
    for n in names:
        _video(videos / f"{n}.mp4", frames=2)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"video": n, "caption": f"c {n}"}) + "\n"
                                                 for n in names + ["lost"]))
    hashes = []
    for run in ("a", "b"):
        with pytest.warns(UserWarning, match="1 of 6"):
            (meta,) = convert.main(["longcap", "--annotations", str(tmp_path / "long.jsonl"), "--videos",
                                    str(videos), "--out", str(tmp_path / run), "--split", "dev", "--workers", "2",
                                    "--shard-size", "2", "--no-progress"])
        assert meta["num_shards"] == 3 and meta["count"] == 5
        assert meta["shards"] == str(tmp_path / run / "dev" / "shard-{000000..000002}.tar")
        hashes.append([hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted((tmp_path / run / "dev").glob("shard-*.tar"))])
    assert hashes[0] == hashes[1]
    assert list(_read(tmp_path / "a", "dev")) == names  # annotation order kept across shards
    saved = json.loads((tmp_path / "a" / "dev" / "meta.json").read_text())
    assert saved["missing"] == 1 and saved["format"] == "longcap"


def test_find_video_and_errors(tmp_path):
    (tmp_path / "a.b.mkv").write_bytes(b"x")
    (tmp_path / "c.mp4").write_bytes(b"x")
    assert convert.find_video(tmp_path, ["a.b"]) == tmp_path / "a.b.mkv"
    assert convert.find_video(tmp_path, ["c.avi"]) == tmp_path / "c.mp4"  # listed extension absent: try others
    assert convert.find_video(tmp_path, ["nope", "c"]) == tmp_path / "c.mp4"
    assert convert.find_video(tmp_path, ["nope"]) is None
    with pytest.raises(ValueError, match="unknown format"):
        convert.convert("kinetics", tmp_path / "x", tmp_path, tmp_path / "out")
    (tmp_path / "bad.txt").write_text("AO8RW 0.0##no end time\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        convert.convert("charades_sta", tmp_path / "bad.txt", tmp_path, tmp_path / "out")
