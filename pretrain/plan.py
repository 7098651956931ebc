"""ZeRO stage chosen from memory, not habit: `zero.stage=auto` and `python -m pretrain plan`.

Per stage the planner adds the model states per GPU (DeepSpeed's estimators, trainer/backend_deepspeed.py) and
the activations of one micro-batch, and picks the LOWEST stage from 1 up that fits the GPU with a margin: a lower
stage communicates less (ZeRO-2 and -3 reduce gradients at every micro-step, stage 1 once per optimizer step)
and runs fewer host ops per parameter (DeepSpeed's stage-2 hooks cost ~3x the host ops of stage 1 per
parameter tensor: docs/performance.md). Stage 0 is never chosen: in bf16 DeepSpeed runs the same optimizer
as stage 1 but keeps the fp32 master weights and Adam moments whole. On one GPU stage 2 is never chosen
either: it partitions nothing there.

Activations (bf16, flash attention: no N x N scores kept): 34 bytes per token per layer per unit of width
(Korthikanti et al. 2022, "Reducing Activation Recomputation", the 34·s·b·h term); with activation
checkpointing only each block's input (2 bytes) is kept, plus one block recomputed at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from vit import ViTConfig

MARGIN = 0.85  # share of the GPU's memory the plan may fill (allocator fragmentation, workspaces, NCCL buffers)


@dataclass
class StagePlan:
    stage: int
    states_gib: float  # model states per GPU
    activations_gib: float  # one micro-batch's saved activations
    comm_gib: float  # bytes each GPU sends per optimizer step, GiB
    fits: bool

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.activations_gib


def param_counts(vcfg: ViTConfig) -> tuple[int, int]:
    """(all parameters, the largest single layer's) of a ViT, from its config."""
    import torch

    from vit import VisionTransformer

    with torch.device("meta"):  # shapes only: no memory, no init
        model = VisionTransformer(vcfg)
    sizes = [p.numel() for p in model.parameters()]
    return sum(sizes), max(sizes)


def activation_bytes(vcfg: ViTConfig, micro_batch: int, grad_checkpointing: bool) -> int:
    """Saved activations of one micro-batch (bf16), per the module docstring's rule."""
    tokens = vcfg.num_patches + 1
    per_layer = 34 * tokens * micro_batch * vcfg.width * vcfg.mlp_ratio / 4  # the 34 assumes an MLP ratio of 4
    if grad_checkpointing:
        return int(2 * tokens * micro_batch * vcfg.width * vcfg.depth + per_layer)
    return int(per_layer * vcfg.depth)


def comm_bytes(stage: int, params: int, gpus: int, accumulation: int) -> int:
    """Bytes each GPU sends per optimizer step, as DeepSpeed runs bf16 with fp32 gradient accumulation (ring
    collectives: (n - 1) / n of the buffer per pass; an all-reduce is two passes).

    Stage 0/1 (its BF16_Optimizer): one fp32 gradient all-reduce per step + a bf16 all-gather of the updated
    shards; stage 2: a bf16 reduce-scatter at every micro-step + that all-gather; stage 3: at every micro-step
    the bf16 weights all-gathered for the forward and again for the backward, and the gradients reduce-scattered.
    """
    if gpus == 1:
        return 0
    ring = (gpus - 1) / gpus
    if stage in (0, 1):
        return int(ring * (2 * 4 + 2) * params)
    if stage == 2:
        return int(ring * (2 * accumulation + 2) * params)
    return int(ring * 3 * 2 * params * accumulation)


def plan(vcfg: ViTConfig, micro_batch: int, accumulation: int, gpus_per_node: int, nodes: int, gpu_mem_gib: float,
         grad_checkpointing: bool = False, max_stage: int = 3) -> tuple[int, list[StagePlan]]:
    """(the chosen stage, the plan of every stage) for one configuration."""
    from trainer.backend_deepspeed import model_states_bytes

    params, largest = param_counts(vcfg)
    act = activation_bytes(vcfg, micro_batch, grad_checkpointing)
    gpus, gib = gpus_per_node * nodes, 2**30
    rows = []
    for stage in (0, 1, 2, 3):
        states = model_states_bytes(stage, params, largest, gpus_per_node, nodes)
        rows.append(StagePlan(stage, states / gib, act / gib, comm_bytes(stage, params, gpus, accumulation) / gib,
                              (states + act) / gib <= MARGIN * gpu_mem_gib))
    candidates = [r for r in rows if r.fits and 0 < r.stage <= max_stage and not (r.stage == 2 and gpus == 1)]
    chosen = candidates[0].stage if candidates else max_stage  # nothing fits: the least memory allowed (and a warning)
    return chosen, rows


def explain(chosen: int, rows: list[StagePlan], gpu_mem_gib: float) -> str:
    """The one log line: which stage and why, with the figures."""
    r = rows[chosen]
    lower = [f"ZeRO-{x.stage} {x.total_gib:.1f} GiB" for x in rows[1:chosen] if not x.fits]
    why = f"lower stages do not fit ({', '.join(lower)})" if lower else "the lowest stage that fits"
    fit = "fits" if r.fits else "DOES NOT FIT: lower train.micro_batch or turn on model.grad_checkpointing"
    return (f"zero.stage=auto -> ZeRO-{chosen}: {r.states_gib:.1f} GiB model states + {r.activations_gib:.1f} GiB "
            f"activations per GPU of {gpu_mem_gib:.0f} GiB x {MARGIN:.0%} ({fit}); {why}; "
            f"{r.comm_gib:.2f} GiB sent per GPU per step")


def table(rows: list[StagePlan], chosen: int) -> str:
    """The `pretrain plan` table."""
    lines = ["stage  states GiB  activations GiB  total GiB  fits  comm GiB/step/GPU"]
    for r in rows:
        mark = "  <- chosen" if r.stage == chosen else ""
        lines.append(f"ZeRO-{r.stage}  {r.states_gib:9.1f}  {r.activations_gib:15.1f}  {r.total_gib:9.1f}  "
                     f"{'yes' if r.fits else 'no':>4}  {r.comm_gib:17.2f}{mark}")
    return "\n".join(lines)


def bucket_elements(params: int) -> int:
    """Reduce/all-gather bucket size sized to the model: a quarter of it, within 5e7..2e8 elements (small buckets
    mean many collectives per micro-step; huge ones leave nothing to overlap with the backward)."""
    return int(min(2e8, max(5e7, params // 4)))


def gpu_memory_gib(local_rank: int, local_world: int) -> float:
    """This process's device memory: the GPU's, or on a CPU-only machine its share of the host's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(local_rank).total_memory / 2**30
    import psutil

    return psutil.virtual_memory().total / 2**30 / max(1, local_world)


def resolve_zero(cfg, vcfg: ViTConfig, gpus_per_node: int, nodes: int, gpu_mem_gib: float):
    """(cfg.zero with every `auto` resolved, the log line explaining the stage or None when it was given)."""
    import dataclasses

    from runtime.dist import accumulation_steps

    z, line = cfg.zero, None
    params, _ = param_counts(vcfg)
    if z.stage == "auto":
        accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, gpus_per_node * nodes)
        stage, rows = plan(vcfg, cfg.train.micro_batch, accum, gpus_per_node, nodes, gpu_mem_gib,
                           cfg.model.grad_checkpointing, max_stage=2 if cfg.train.ema_decay else 3)
        z, line = dataclasses.replace(z, stage=stage), explain(stage, rows, gpu_mem_gib)
    buckets = bucket_elements(params)
    return dataclasses.replace(
        z, overlap_comm=(not cfg.model.compile) if z.overlap_comm == "auto" else z.overlap_comm,
        reduce_bucket_size=buckets if z.reduce_bucket_size == "auto" else z.reduce_bucket_size,
        allgather_bucket_size=buckets if z.allgather_bucket_size == "auto" else z.allgather_bucket_size), line
