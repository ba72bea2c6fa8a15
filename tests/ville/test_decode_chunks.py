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


def _cheapest_first_chunk(n, remaining, survival, fixed):
    """Brute force over every way to split `remaining` steps into forwards: -> (cost, first chunk) of the cheapest,
    with forward cost fixed * P(some row live at its first step) + (rows live there) * its steps: rows = n f, P =
    1 - (1 - f)^n, f = survival[step]."""
    best = None
    for cuts in range(1 << (remaining - 1)):  # bit i set: a forward ends after step i + 1
        sizes, run = [], 1
        for i in range(remaining - 1):
            if cuts >> i & 1:
                sizes.append(run)
                run = 0
            run += 1
        sizes.append(run)
        cost, u = 0.0, 0
        for s in sizes:
            f = survival[u]
            cost += fixed * (1 - (1 - f) ** n) + n * f * s
            u += s
        if best is None or cost < best[0] - 1e-9:
            best = (cost, sizes[0])
    return best


def test_plan_chunk_is_the_cheapest_split(monkeypatch):
    """plan_chunk's first step equals the brute-force cheapest split of the remaining steps under the cost model, for
    stop rates from none to all; before any stop could be seen it spreads one forward's fixed cost over the rows."""
    session = _DecodeSession.__new__(_DecodeSession)
    gen = torch.Generator().manual_seed(5)
    for _ in range(40):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        remaining = int(torch.randint(1, 9, (1,), generator=gen))
        row_steps = int(torch.randint(1, 200, (1,), generator=gen))
        stops = int(torch.randint(0, row_steps + 1, (1,), generator=gen))
        fixed = int(torch.randint(2, 40, (1,), generator=gen))
        monkeypatch.setattr(_DecodeSession, "chunk_tokens", fixed)
        session.active = torch.arange(n)
        live = 1.0 - min(max(stops / row_steps, 1e-3), 1.0)
        want = _cheapest_first_chunk(n, remaining, [live ** u for u in range(remaining)], fixed)[1]
        assert session.plan_chunk(remaining, row_steps, stops) == want, (n, remaining, row_steps, stops, fixed)
        # A survival curve from earlier calls' stops (non-increasing, from 1) replaces the rate.
        survival = torch.cat([torch.ones(1), torch.rand(remaining - 1, generator=gen).sort(descending=True).values])
        survival = survival.tolist()
        want = _cheapest_first_chunk(n, remaining, survival, fixed)[1]
        assert session.plan_chunk(remaining, 0, 0, survival) == want, (n, remaining, survival, fixed)
    session.active = torch.arange(32)
    monkeypatch.setattr(_DecodeSession, "chunk_tokens", 24)
    assert session.plan_chunk(16, 0, 0) == 1 and session.plan_chunk(3, 0, 0) == 1
    session.active = torch.arange(5)
    assert session.plan_chunk(16, 0, 0) == 5 and session.plan_chunk(2, 0, 0) == 2
    assert session.plan_chunk(16, 100, 100) == 1  # every row stops after each step: no step is worth sharing
    monkeypatch.setattr(_DecodeSession, "chunk_tokens", 1)
    assert session.plan_chunk(16, 100, 0) == 1  # one step per forward, as generate() decodes


def test_earlier_stops_plan_the_first_forward(monkeypatch):
    """Rows that stop after 4 tokens (a stop-bias ladder), chunk_tokens 6: the first call, with no stop seen yet,
    needs two forwards to get there; it records the stops, and the next call plans from them: one forward of
    exactly 4 steps, same counts and embeddings. A forced schedule (benchmarks) plans from them but does not record."""
    model = build("llama")
    K = model.cfg.embed.max_embed_tokens
    with torch.no_grad():
        model.stop_step_bias.copy_(torch.tensor([-1e4] * 3 + [1e4] * (K - 3)))
        fr = frames(3, seed=4)
        first, forwards_first = _embed_counting_forwards(model, fr, None, 6, monkeypatch)
        assert first.num_tokens.tolist() == [4, 4, 4] and forwards_first == 2
        assert model._stop_history[(K, 1)][4] == 3 and sum(model._stop_history[(K, 1)]) == 3
        again, forwards_again = _embed_counting_forwards(model, fr, None, 6, monkeypatch)
        assert forwards_again == 1 and again.num_tokens.tolist() == [4, 4, 4] and model._stop_history[(K, 1)][4] == 6
        torch.testing.assert_close(again.embeddings, first.embeddings, rtol=1e-5, atol=1e-5)
        assert model._stop_survival(model._stop_history[(K, 1)], 0, 5) == [1.0, 1.0, 1.0, 1.0, 0.0]
        forced, forwards_forced = _embed_counting_forwards(model, fr, torch.tensor([4, 4, 2]), 6, monkeypatch)
        assert forced.num_tokens.tolist() == [4, 4, 2] and forwards_forced == 1
        assert sum(model._stop_history[(K, 1)]) == 6
