"""`python -m pretrain train|config|export|eval|plan`: DeepSpeed ZeRO pre-training of a ViT.

  python -m pretrain train RECIPE [key.sub=value ...] [--allow-changed]   (under deepspeed, torchrun or srun)
  python -m pretrain config RECIPE [key.sub=value ...] [--yaml]           (the resolved config; no training)
  python -m pretrain export RUN_DIR [--tag T] [--out F] [--ema] [--dtype bf16|fp32] [--format vitscale|timm|hf]
  python -m pretrain eval RUN_DIR_OR_WEIGHTS data.path=.../dataset.json [key=value ...]
  python -m pretrain plan RECIPE [key=value ...] --gpus 8 [--nodes 4] --gpu-mem 80    (no GPU needed)
"""

from __future__ import annotations

from runtime.argtypes import count, number
from runtime.config import ConfigError
from trainer.cli import stage_main


def _train(recipe: str, overrides: list[str], allow_changed: bool = False) -> dict:
    from pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(recipe, overrides)  # a bad key or value fails before torch loads
    from pretrain.train import train

    return train(cfg, allow_changed)


def _config():
    """For the `config` verb: the config class, the recipes folder, the validation `train` applies."""
    from pretrain.config import RECIPES_DIR, PretrainConfig, validate

    return PretrainConfig, RECIPES_DIR, validate


def _plan_verb(sub) -> dict:
    v = sub.add_parser("plan", help="memory and traffic per GPU of each ZeRO stage, and the one auto would choose")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", help="key.sub=value (data.path and run.dir are not needed)")
    v.add_argument("--gpus", type=count, default=8, help="GPUs per node (default 8)")
    v.add_argument("--nodes", type=count, default=1)
    v.add_argument("--gpu-mem", type=number(0, strict=True), default=80.0, help="GiB per GPU (default 80)")
    return {"plan": _plan}


def _plan(args) -> None:
    from pretrain.config import load_pretrain_config
    from pretrain.plan import explain, plan, table
    from pretrain.train import model_config
    from runtime.dist import accumulation_steps

    cfg = load_pretrain_config(args.recipe, ["data.path=unset", "run.dir=unset", *args.overrides])
    vcfg = model_config(cfg, cfg.data.num_classes or 21843)
    try:
        accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, args.gpus * args.nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    chosen, rows = plan(vcfg, cfg.train.micro_batch, accum, args.gpus, args.nodes, args.gpu_mem,
                        cfg.model.grad_checkpointing, max_stage=2 if cfg.train.ema_decay else 3)
    print(f"{cfg.model.variant} @ {vcfg.image_hw[0]} px, micro-batch {cfg.train.micro_batch} x accumulation {accum} "
          f"x {args.gpus * args.nodes} GPUs ({args.nodes} node(s) x {args.gpus}) = {cfg.train.global_batch}, "
          f"{args.gpu_mem:.0f} GiB per GPU")
    print(table(rows, chosen))
    print(explain(chosen, rows, args.gpu_mem))


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m pretrain", __doc__, "pretrain/recipes", _train, argv, config=_config, extra=_plan_verb)


if __name__ == "__main__":
    raise SystemExit(main())
