"""vitscale's Vision Transformer: model, variants, pos-embed resampling, FLOPs and weight files."""

from vit.config import ViTConfig, variant_names, vit_config
from vit.flops import inference_flops_per_image, train_flops_per_image
from vit.model import VisionTransformer
from vit.pos_embed import resample_pos_embed

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "inference_flops_per_image",
    "resample_pos_embed",
    "train_flops_per_image",
    "variant_names",
    "vit_config",
]
