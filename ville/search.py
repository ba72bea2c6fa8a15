"""Text -> video search over an index built by `ville.index`, optionally re-ranked by the matching head.

    python -m ville.search INDEX "query text" [-k 5] [--model MODEL_DIR] [--rerank [--rerank-k 20]
                           [--rerank-score match|lm] [--rerank-fusion W]] [--json]

The index is read without pickle (`ville.index.load_index`: safetensors + JSON), so a shared index cannot run code.
The query is embedded by the model that built the index (its folder is stored in the index; `--model` points
elsewhere, e.g. after moving it). A model whose weights differ from the index's (`ville.checkpoint.model_identity`)
is refused: its text embeddings live in a different space, and the scores would be meaningless.

Top-k is exact: a stable sort of the cosine scores in PyTorch (equal scores: lower index first). Above
`FAISS_MIN_SIZE` videos, FAISS's exact inner-product index is used when `faiss` is importable (same results up to
float rounding and tie order, faster on large galleries). `--rerank` scores the top `--rerank-k` videos (decoding
each again from its file or shard) with the matching head's probability (`--rerank-score match`, `model.match`) or
the query's mean log-probability per token as the video's caption (`lm`, `model.target_logprob`), and orders them by
that score or, with `--rerank-fusion W`, by logit_scale x cosine + W x score (the logit of the probability for
`match`), as `ville.eval`'s `rerank` does (ties keep the embedding order); the printed list is its first k. For the
tiny demo model the val split chose lm at W = 2 (the matching head alone is below chance there; docs/design.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions, so `python -m ville.search --help` answers without it (seconds to import).

FAISS_MIN_SIZE = 100_000


class ModelMismatchError(ValueError):
    pass


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def topk(embeddings: torch.Tensor, query: torch.Tensor, k: int, use_faiss: bool | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings (N, D), query (D,) -> (scores (k',), indices (k',)), k' = min(k, N), best first.
    use_faiss None: FAISS when importable and N > FAISS_MIN_SIZE."""
    import torch

    n = embeddings.shape[0]
    k = min(k, n)
    faiss = _faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ValueError("use_faiss=True but faiss is not importable")
    if faiss is not None and (use_faiss or n > FAISS_MIN_SIZE):
        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(embeddings.float().contiguous().numpy())
        scores, idx = index.search(query.float().reshape(1, -1).numpy(), k)
        return torch.from_numpy(scores[0]), torch.from_numpy(idx[0]).long()
    scores = embeddings.float() @ query.float()
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return scores[order], order


def check_identity(index: dict, identity: str, model_dir: str) -> None:
    if index["model_identity"] != identity:
        raise ModelMismatchError(
            f"model mismatch: the index was built by model {index['model_identity']} "
            f"({index.get('model_dir')}), but {model_dir} has identity {identity}; its query embeddings would live in "
            f"a different space. Query with the indexing model, or rebuild the index with python -m ville.index")


def _frames(source: dict, num_frames: int, frame_size: int | None, stores: dict):
    import torch

    from .data import ClipStore
    from .video import decode_clip

    if "path" in source:
        data = source["path"]
    else:
        store = stores.setdefault(source["shard"], ClipStore(source["shard"]))
        data = store.read(source["key"])
    return torch.from_numpy(decode_clip(data, num_frames, size=frame_size)[0])


def search(index: dict, model, query: str, k: int = 5, *, rerank: bool = False, rerank_k: int | None = None,
           rerank_score: str = "match", rerank_fusion: float | None = None, batch_size: int = 8) -> list[dict]:
    """Ranked hits [{"rank", "id", "score" (cosine), "match" or "lm" (when rerank: the re-ranking score), "source"}]."""
    import torch

    from .eval.retrieval import check_rerank_score, fused_scores, pair_scores

    check_rerank_score(rerank_score)

    with torch.no_grad():
        q = model.embed_text([query])[0].float().cpu()
        depth = max(k, rerank_k or 0) if rerank else k
        scores, idx = topk(torch.as_tensor(index["embeddings"]), q, depth)
        hits = [{"id": index["ids"][i], "score": float(s), "source": index["sources"][i]}
                for s, i in zip(scores.tolist(), idx.tolist())]
        if rerank:
            stores: dict = {}
            for c in range(0, len(hits), batch_size):
                chunk = hits[c:c + batch_size]
                frames = torch.stack([_frames(h["source"], index["num_frames"], index["frame_size"], stores)
                                      for h in chunk]).to(model.device)
                for h, v in zip(chunk, pair_scores(model, frames, [query] * len(chunk), rerank_score).tolist()):
                    h[rerank_score] = v
            cosine, values = (torch.tensor([h[name] for h in hits], dtype=torch.float64)
                              for name in ("score", rerank_score))
            order = fused_scores(cosine, values, rerank_score, float(model.logit_scale.exp().reshape(())),
                                 rerank_fusion).tolist()
            # stable: equal scores keep the embedding order
            hits = [h for _, h in sorted(zip(order, hits), key=lambda p: -p[0])]
        return [{"rank": r + 1, **h} for r, h in enumerate(hits[:k])]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m ville.search", description=__doc__.split("\n\n")[0])
    p.add_argument("index", help="index file written by python -m ville.index")
    p.add_argument("query", help="query text")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--model", default=None, help="model folder (default: the one stored in the index)")
    p.add_argument("--rerank", action="store_true", help="re-rank the top hits by a matching score (decodes videos)")
    p.add_argument("--rerank-k", type=int, default=20, help="how many embedding hits are re-scored")
    p.add_argument("--rerank-score", choices=("match", "lm"), default="match",
                   help="the matching head's probability, or the query's log-probability as the video's caption")
    p.add_argument("--rerank-fusion", type=float, default=None, metavar="W",
                   help="order by logit_scale x cosine + W x score (default: the score alone)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    a = p.parse_args(argv)
    import torch

    from .checkpoint import model_identity
    from .index import load_index
    from .model import ViLLE

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")

    try:
        index = load_index(a.index)
        model_dir = a.model or index.get("model_dir")
        if not model_dir or not os.path.isdir(model_dir):
            raise ValueError(f"model folder {model_dir!r} not found; pass --model")
        check_identity(index, model_identity(model_dir), model_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    model = ViLLE.from_pretrained(model_dir, map_location=a.device).eval()
    hits = search(index, model, a.query, a.k, rerank=a.rerank, rerank_k=a.rerank_k, rerank_score=a.rerank_score,
                  rerank_fusion=a.rerank_fusion)
    if a.json:
        print(json.dumps(hits, indent=1))
    else:
        width = max(len(str(h["rank"])) for h in hits)
        for h in hits:
            match = f"  match {h['match']:.4f}" if "match" in h else ""
            print(f"{h['rank']:>{width}}  cos {h['score']:+.4f}{match}  {h['id']}")
    return hits


if __name__ == "__main__":
    main()
