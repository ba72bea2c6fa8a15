"""ville: one video LLM that writes text about a video and emits adaptive-length retrieval embeddings.

    import ville
    model = ville.ViLLE.from_recipe("recipes/tiny/stage3.yaml")
    out = model.embed_video(frames)      # out.embeddings (B, D), out.num_tokens (B,)
"""
from .model import EmbedCfg, EmbedOutput, EmbedSteps, ModelCfg, ViLLE

__all__ = ["ViLLE", "ModelCfg", "EmbedCfg", "EmbedOutput", "EmbedSteps"]
__version__ = "0.1.0"
