"""DeepSpeed ZeRO pre-training of Vision Transformers: recipes, engine, loop, checkpoints, export."""
