"""diffnb: hooks and attention processors for reading and rewiring text-to-image diffusion UNets."""
from .hooks import CrossAttentionStore, FeatureCache, capture
from .models import REGISTRY, load_pipeline, pick_device, pick_dtype, tiny_pipeline
from .processors import AttentionProcessor, RunState, TokenReweight, attention_layers, patch_attention, track_steps

__version__ = "0.1.0"
__all__ = ["AttentionProcessor", "CrossAttentionStore", "FeatureCache", "REGISTRY", "RunState", "TokenReweight",
           "attention_layers", "capture", "load_pipeline", "patch_attention", "pick_device", "pick_dtype",
           "tiny_pipeline", "track_steps"]
