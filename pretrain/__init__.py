"""vitscale pretrain package."""
