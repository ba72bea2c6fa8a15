"""Embedding decode with several steps per forward (`_DecodeSession.chunk_tokens`, issue 20 item 6): the chunked loop
runs fewer decoder forwards and gives the one-step-per-forward loop's counts, embeddings and stop probabilities
(Llama, Qwen2 and Gemma-2 with its softcap and sliding window)."""
from __future__ import annotations

import torch
from conftest import build, frames

from ville.model import _DecodeSession


def _embed_counting_forwards(model, fr, schedule, chunk_tokens, monkeypatch):
    calls = {"n": 0}
    step = _DecodeSession.step

    def counted(self, x):
        calls["n"] += 1
        return step(self, x)

    monkeypatch.setattr(_DecodeSession, "chunk_tokens", chunk_tokens)
    monkeypatch.setattr(_DecodeSession, "step", counted)
    out = model.embed_video(fr, _stop_schedule=schedule)
    monkeypatch.setattr(_DecodeSession, "step", step)
    return out, calls["n"]


def test_chunked_steps_equal_single_steps(family, monkeypatch):
    model = build(family)
    fr = frames(5, seed=11)
    K = model.cfg.embed.max_embed_tokens
    schedule = torch.tensor([1, K, 3, 2, K])
    one, forwards_one = _embed_counting_forwards(model, fr, schedule, 1, monkeypatch)
    many, forwards_many = _embed_counting_forwards(model, fr, schedule, 8, monkeypatch)
    assert forwards_one == K and forwards_many < forwards_one
    assert many.num_tokens.tolist() == one.num_tokens.tolist() == schedule.tolist()
    torch.testing.assert_close(many.embeddings, one.embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.stop_probs, one.stop_probs, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_benchmark_pad_fill_stops_with_the_last_sample(monkeypatch):
    """bench/bench_decode.py's pad-fill baseline keeps finished rows but ends when the last sample stops (Hugging
    Face generate()); it used to run all K steps whatever the stops (16x 'speed-ups' when every sample stops at 1)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import bench_decode

    model = build("llama")
    monkeypatch.setattr(_DecodeSession, "chunk_tokens", 1)
    fr = frames(3, seed=2)
    K = model.cfg.embed.max_embed_tokens
    for schedule, forwards in ((torch.tensor([1, 1, 1]), 1), (torch.tensor([1, 3, 2]), 3), (torch.full((3,), K), K)):
        _, _, ran = bench_decode.run_once(model, fr, schedule, torch.device("cpu"), padfill=True)
        assert ran == forwards, f"stops {schedule.tolist()}: pad-fill ran {ran} forwards, expected {forwards}"
