"""The final model, in a format its users load without fedshield.

Text tasks: Hugging Face `save_pretrained` + tokenizer (LoRA adapters merged), so that
`transformers.pipeline("text-classification", model=<run>/model)` works offline.
Text generation: the LoRA adapter folder (task.causal_lm.export_adapter), which
`peft.PeftModel.from_pretrained(base, <run>/model)` loads for `generate()`.
Tabular tasks: safetensors weights + a config.json describing the MLP and its features.
Image tasks: `save_pretrained` + a preprocessor_config.json (size, mean, std); its BatchNorms
are GroupNorms (config `fedshield_batchnorm_to_groupnorm`): load it with
`fedshield.task.image.load_exported` (task/image.py).
Plug-in tasks: the model's state dict (safetensors) + a config.json naming the plug-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from safetensors.torch import save_file
from transformers import PreTrainedModel

from fedshield.conf.config import Config
from fedshield.task import causal_lm
from fedshield.task.image import write_preprocessor_config
from fedshield.task.model import TabularMLP, TrainView, fold_center, text_model_type
from fedshield.task.pipeline import pool_and_test, tokenizer


def export_model(cfg: Config, view: TrainView, out: Path) -> Path:
    if cfg.task.name == causal_lm.TASK:  # the adapter itself, not merged: peft loads it onto the base
        return causal_lm.export_adapter(cfg.task.model, view, out)
    out.mkdir(parents=True, exist_ok=True)
    fold_center(view)  # pooler(x - c) becomes pooler(x) with bias - W c: a plain BERT
    model = view.model
    merge = getattr(model, "merge_and_unload", None)
    if merge is not None:  # peft: fold LoRA into the base weights
        model = merge()
    if cfg.task.name == "image":
        cast(PreTrainedModel, model).cpu().save_pretrained(out)
        write_preprocessor_config(cfg.task.model, cfg.task.image_size, out)
        return out
    if text_model_type(model) is not None:  # any transformers sequence classifier
        cast(PreTrainedModel, model).cpu().save_pretrained(out)
        tokenizer(cfg.task.model).save_pretrained(out)
        return out
    test = pool_and_test(cfg)[1]
    if not isinstance(model, TabularMLP):  # a plug-in's model (task/plugin.py): its weights; the plug-in rebuilds it
        # clone: safetensors refuses tensors that share memory (tied weights)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
                  out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({
            "architecture": "fedshield-plugin", "task": cfg.task.name, "plugin": cfg.task.plugin,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "class_names": test.class_names,
        }, indent=2))
        return out
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({
        "architecture": "TabularMLP", "num_features": model.num_features,
        "num_classes": model.num_classes, "hidden_units": model.hidden,
        "class_names": test.class_names, "feature_names": test.feature_names,
    }, indent=2))
    return out
