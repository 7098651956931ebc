"""vitscale finetune package."""
