"""The README.md (a Hugging Face model card) that `export --format hf|timm-dir` writes beside the weights.

The Hub shows a folder's README.md as its model page and reads the YAML front matter (library, task, tags);
timm's own `push_to_hub` writes one too. Ours is made from the checkpoint alone: the model, how it was trained
(the resolved config), what it scored during the run (with the step and the weights measured, so a figure is
never claimed for other weights), the eval transform the folder's processor config repeats, and how to load it.
"""

from __future__ import annotations

from vit import ViTConfig
from vit.config import variant_names, vit_config
from vit.weights import EvalSettings

LIBRARY = {"hf": "transformers", "timm-dir": "timm"}
OFF = {"optim.layer_decay": (None, 1.0)}  # values that mean "not used" (else None and 0), left out of the table
TRAINING_KEYS = ("optim.name", "optim.lr", "optim.weight_decay", "optim.layer_decay", "optim.schedule",
                 "optim.warmup_steps", "train.global_batch", "train.steps", "train.epochs", "train.samples",
                 "train.label_smoothing", "train.mixup", "train.cutmix", "train.ema_decay", "model.drop_path",
                 "data.scale", "data.randaugment", "precision")


def _get(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _scores(state: dict, ema: bool) -> list[str]:
    """The run's evals as table rows, each saying which weights it measured."""
    rows = []
    for m in state.get("evals") or []:
        kept = "EMA" if state.get("evaluated_ema") else "model"
        rows.append(f"| {m['step']} | {m['top1']:.2%} | {m['top5']:.2%} | {m['samples']} | {kept} |")
        if state.get("evaluated_ema") and "raw_top1" in m:
            rows.append(f"| {m['step']} | {m['raw_top1']:.2%} | | {m['samples']} | model (raw) |")
    exported = "EMA" if ema else "model"
    note = (f"These weights: step {state['step']}, the {exported} weights; a row of another step or of other "
            "weights measured those, not these.")
    return ["| step | top-1 | top-5 | images | weights |", "|---|---|---|---|---|", *rows, "", note] if rows else [
        "No evaluation had run by this checkpoint (data.val_split null, or none due yet)."]


def model_card(fmt: str, vcfg: ViTConfig, state: dict, settings: EvalSettings, ema: bool = False) -> str:
    """The model card of checkpoint `state` (trainer_state.json) exported as `fmt` ("hf" or "timm-dir")."""
    config, names = state.get("config") or {}, state.get("class_names") or []
    h, w = vcfg.image_hw
    init = config.get("init")
    origin = f"fine-tuned from `{init}`" if init else "pre-trained from scratch"
    val = _get(config, "data.val_split") or "val"
    dataset = _get(config, "data.path") or "?"
    lines = [
        "---", f"library_name: {LIBRARY[fmt]}", "pipeline_tag: image-classification", "tags:",
        "- image-classification", "- vision-transformer", "- vitscale", "---", "",
        f"# ViT{_variant(vcfg)} at {h}x{w} px, {len(names) or vcfg.num_classes} classes",
        "",
        f"A Vision Transformer (patch {vcfg.patch_size}, width {vcfg.width}, depth {vcfg.depth}, {vcfg.heads} heads, "
        f"MLP ratio {vcfg.mlp_ratio:g}, {'class-token' if vcfg.pool == 'token' else 'mean'} pooling) {origin} with "
        f"vitscale: {state['step']} optimizer steps on `{dataset}`.",
        "", f"## Evaluation (split `{val}`, during training)", "", *_scores(state, ema), "",
        "Eval transform (the folder's preprocessing config repeats it): resize, aspect kept, to cover "
        f"{round(h / settings.crop_pct)}x{round(w / settings.crop_pct)} px ({settings.interpolation}), centre crop "
        f"{h}x{w}, then (pixel / 255 - mean) / std with mean {list(settings.mean)} and std {list(settings.std)}.",
        "", "## Training", "", "| key | value |", "|---|---|",
        *(f"| `{k}` | `{_get(config, k)}` |" for k in TRAINING_KEYS if _get(config, k) not in OFF.get(k, (None, 0))),
        "", "## Use", "", "```python", *_usage(fmt), "```", "",
    ]
    return "\n".join(lines)


def _variant(vcfg: ViTConfig) -> str:
    """"-L/16" where the shape is a paper variant's (a fine-tuning config names none), else ""."""
    for name in variant_names():
        v = vit_config(name)
        if name != "debug" and (v.patch_size, v.width, v.depth, v.heads) == (
                vcfg.patch_size, vcfg.width, vcfg.depth, vcfg.heads):
            return f"-{name}"
    return ""


def _usage(fmt: str) -> list[str]:
    if fmt == "timm-dir":
        return ["import timm", "",
                'model = timm.create_model("local-dir:PATH", pretrained=True).eval()  # or "hf-hub:USER/REPO"',
                "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))"]
    return ["from transformers import pipeline", "",
            'classify = pipeline("image-classification", model="PATH")  # or "USER/REPO"',
            'print(classify("image.jpg"))']
