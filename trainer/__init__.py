"""The training core both stages run: config sections, the step loop, checkpoints, eval, logging, export.

Backends (`trainer.backend_deepspeed`, `trainer.backend_accelerate`) are the only modules that import their
library; a stage (`pretrain`, `finetune`) is configuration plus loading. See docs/architecture.md.
"""
