"""Where each sequence-classification family keeps its parts, and what can train in it.

`AutoModelForSequenceClassification` loads many architectures, but they differ in what a
training view needs to know: the attribute of the base model, the list of transformer
layers, the modules the classification class adds on top (the head), the attention
projections LoRA wraps, and whether the upper layers can run on cached hidden states.
One row per family (`FAMILIES`, keyed by config.json's `model_type`) holds these facts;
`task.model.make_train_view` reads them, and `refusal` says why an unsupported
(family, mode) in one line before the federation starts.

Modes (training.trainable):
- `all`: every weight. Works for any model transformers loads.
- `head`: only the modules the classification class adds (BERT's `classifier`, GPT-2's
  `score`, DeBERTa's `pooler` + `classifier`, ...). An unknown family works when its head
  is a top-level `classifier` or `score` (the transformers convention).
- `lora`: LoRA adapters on the family's attention projections + the head; an unknown family
  works where peft knows its default targets.
- `last_layers`: the top k layers + the head, the frozen prefix's hidden states computed
  once and cached (task.pipeline.encode). Only where a layer runs on a cached hidden state
  and an additive padding mask alone: the BERT-style encoders (BERT, RoBERTa/XLM-R,
  ELECTRA). DeBERTa-v2's layers need the relative-position embeddings the encoder builds,
  ModernBERT's rotary embeddings and local/global masks, DistilBERT's blocks another mask
  convention, the decoders rotary/causal masks the model builds per call: they are refused
  in this mode (a cache for them would re-implement each model's mask construction).

Decoders classify from the last non-padding token, so they need `pad_token_id`; GPT-2 and
Llama configs have none, and `task.model.build_text_model` sets it from the tokenizer (its
pad token, else its end-of-sequence token).
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("all", "last_layers", "lora", "head")


@dataclass(frozen=True)
class Family:
    """What a training view needs to know about one `model_type`."""

    name: str  # what the user reads in a message
    base: str  # attribute of the base model in the *ForSequenceClassification class
    layers: str  # dotted path of the layer list, from the classification model
    head: tuple[str, ...]  # top-level modules the classification class adds (trained in head/lora)
    lora_targets: tuple[str, ...]  # attention projections LoRA wraps
    modes: tuple[str, ...]  # the trainable modes that work
    token_types: bool = False  # the forward takes token_type_ids (zeros are passed explicitly)
    decoder: bool = False  # classifies from the last non-pad token: needs pad_token_id


_ENCODER_MODES = ("all", "last_layers", "lora", "head")
_NO_CACHE_MODES = ("all", "lora", "head")

FAMILIES: dict[str, Family] = {
    "bert": Family("BERT", "bert", "bert.encoder.layer", ("classifier",), ("query", "value"), _ENCODER_MODES,
                   token_types=True),
    "roberta": Family("RoBERTa", "roberta", "roberta.encoder.layer", ("classifier",), ("query", "value"),
                      _ENCODER_MODES),
    "xlm-roberta": Family("XLM-RoBERTa", "roberta", "roberta.encoder.layer", ("classifier",), ("query", "value"),
                          _ENCODER_MODES),
    "electra": Family("ELECTRA", "electra", "electra.encoder.layer", ("classifier",), ("query", "value"),
                      _ENCODER_MODES, token_types=True),
    "distilbert": Family("DistilBERT", "distilbert", "distilbert.transformer.layer", ("pre_classifier", "classifier"),
                         ("q_lin", "v_lin"), _NO_CACHE_MODES),
    "deberta-v2": Family("DeBERTa-v2", "deberta", "deberta.encoder.layer", ("pooler", "classifier"),
                         ("query_proj", "value_proj"), _NO_CACHE_MODES, token_types=True),
    "modernbert": Family("ModernBERT", "model", "model.layers", ("head", "classifier"), ("Wqkv",), _NO_CACHE_MODES),
    "gpt2": Family("GPT-2", "transformer", "transformer.h", ("score",), ("c_attn",), _NO_CACHE_MODES, decoder=True),
    "llama": Family("Llama", "model", "model.layers", ("score",), ("q_proj", "v_proj"), _NO_CACHE_MODES,
                    decoder=True),
    "qwen2": Family("Qwen2", "model", "model.layers", ("score",), ("q_proj", "v_proj"), _NO_CACHE_MODES,
                    decoder=True),
    "mistral": Family("Mistral", "model", "model.layers", ("score",), ("q_proj", "v_proj"), _NO_CACHE_MODES,
                      decoder=True),
    "phi": Family("Phi", "model", "model.layers", ("score",), ("q_proj", "v_proj"), _NO_CACHE_MODES, decoder=True),
}

# An unknown model_type's head, by the transformers convention (peft's SEQ_CLS modules_to_save).
GENERIC_HEADS = ("classifier", "score")


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def lora_targets(model_type: str) -> list[str] | None:
    """The modules LoRA wraps: the family's, else peft's defaults for the type, else None."""
    fam = family_of(model_type)
    if fam is not None:
        return list(fam.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type)
    return list(targets) if targets else None


def generic_modes(model_type: str, head_found: bool | None = None) -> tuple[str, ...]:
    """The modes an unknown family gets: all; head when its head is found (None: not
    known yet, counted as found); lora when peft knows its targets."""
    modes = ["all"]
    if head_found is None or head_found:
        modes.append("head")
    if lora_targets(model_type):
        modes.append("lora")
    return tuple(modes)


def supported_modes(model_type: str) -> tuple[str, ...]:
    fam = family_of(model_type)
    return fam.modes if fam is not None else generic_modes(model_type)


def refusal(model_type: str, mode: str, where: str = "task.model") -> str | None:
    """None if `mode` trains a model of `model_type`, else the one line that says why not
    and which modes work (task.model.check_trainable raises it as a ModelError)."""
    modes = supported_modes(model_type)
    if mode in modes:
        return None
    fam = family_of(model_type)
    name = fam.name if fam is not None else f"model_type {model_type!r} (not in fedshield's family table)"
    why = {
        "last_layers": "its upper layers cannot run on cached hidden states",
        "head": "its classification head is not a top-level `classifier` or `score`",
        "lora": "peft knows no default LoRA targets for it",
    }.get(mode, "")
    return (f"{where}: training.trainable={mode} does not work for {name}"
            f"{': ' + why if why else ''}; use training.trainable={' | '.join(modes)}")


def head_modules(model_type: str, top_level: list[str]) -> tuple[str, ...]:
    """The head's top-level module names for this model (the table's, else the convention's)."""
    fam = family_of(model_type)
    if fam is not None:
        return fam.head
    return tuple(n for n in GENERIC_HEADS if n in top_level)

