"""ville: one video LLM that writes text about a video and emits adaptive-length retrieval embeddings.

    import ville
    model = ville.ViLLE.from_recipe("recipes/tiny/stage3.yaml")
    out = model.embed_video(frames)      # out.embeddings (B, D), out.num_tokens (B,)

The model classes are imported lazily, so `python -m ville.data`-style tools and error paths start without loading
transformers.
"""
__version__ = "0.1.0"
__all__ = ["ViLLE", "ModelCfg", "EmbedCfg", "EmbedOutput", "EmbedSteps"]


def __getattr__(name):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'ville' has no attribute {name!r}")
