"""Causal-LM fine-tuning (`task.name=text-generation`): LoRA on a decoder under DP-SGD.

Privacy unit. One record is one document, and one document is ONE sample for Opacus:
Poisson sampling draws documents, and per-sample clipping clips each document's gradient.
A document longer than `task.max_length` tokens is truncated, never chunked: chunks would
be several samples of one record, each clipped alone, so one record would move the sum by
up to (chunks x max_grad_norm) and the ε would be wrong for the stated unit.

Loss. Each document's loss is the mean next-token cross-entropy over ITS OWN tokens
(padding is labelled -100 and ignored), and the batch loss is the mean over documents
(`DocumentLoss`). A token-level mean over the whole batch would divide each document's
gradient by the batch's token count, a number that depends on the other documents: after
clipping, removing one document would then change every other document's contribution,
and the sensitivity analysis of DP-SGD would not hold. Opacus (hooks mode, loss_reduction
"mean") multiplies by the batch size, so each per-sample gradient is that document's own.

Models. Any folder that `AutoModelForCausalLM` reads (GPT-2, Llama, Qwen2, Mistral, Phi,
...). No pretrained decoder ships in any package here, so the default (`task.model=""`) is
the bundled all-MiniLM-L6-v2 loaded as `BertLMHeadModel` (`is_decoder=True`: a causal
attention mask, the LM head's decoder tied to the word embeddings). Its checkpoint has no
LM-head transform (dense + LayerNorm): those weights are new, like a classifier head, so
they train in full next to the LoRA adapters (peft `modules_to_save`, found from the
loader's missing keys), and they are saved with the adapter. A decoder needs a pad token:
a tokenizer without one pads with its EOS token (padding never enters the loss; positions
are passed explicitly, so padding sits on the right).

Weights. Only LoRA adapters (and the new head modules) train and travel; ghost clipping is
refused by the config check (tied weights), hooks mode is used. BERT's and GPT-2's batch-1
position-id buffers are replaced by explicit per-row position ids, so per-sample
gradients never see a batch-1 tensor.

Evaluation: perplexity exp(total NLL / total tokens) over the held-out documents' tokens.
Export: the adapter folder (`save_pretrained` of the peft model) + tokenizer, which
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load_kwargs), dir)`
loads for `generate()`; `fedshield-base.json` in it names the base and its load arguments.
"""

from __future__ import annotations

import json
import math
import os
import stat
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedshield.task.data import DataError, LabeledData, _csv_records, _jsonl_records, _utf8_lines, check_data_file
from fedshield.task.model import (
    WEIGHT_FILES,
    ModelError,
    TrainView,
    _check_weights,
    _quiet_transformers,
    _read_json,
    _regular,
    bundled_model_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK = "text-generation"
# The one pseudo-class of a document corpus: the rest of the system (partitions, plans)
# carries class names; a causal LM has no labels, every record is "a document".
DOCUMENT = "document"
IGNORE_INDEX = -100  # CrossEntropyLoss' ignore_index: padding and the last position
NEW_MODULES = "_fedshield_new_modules"  # attribute: the model's leaf modules its checkpoint lacked
BASE_FILE = "fedshield-base.json"  # in the exported adapter: which base and how to load it


# ---------------------------------------------------------------------------- data


def as_documents(data: LabeledData) -> LabeledData:
    """The texts of `data` as documents (labels dropped: one pseudo-class)."""
    return LabeledData(labels=np.zeros(len(data), dtype=np.int64), class_names=[DOCUMENT], texts=list(data.texts or []),
                       groups=data.groups, source=data.source)


def load_documents(path: str | Path, text_column: str = "text") -> LabeledData:
    """A site's CSV or JSONL file of documents: only `text_column` is read."""
    p = check_data_file(path)
    reader = _csv_records if p.suffix.lower() == ".csv" else _jsonl_records
    texts: list[str] = []
    for line, values in reader(p, _utf8_lines(p), [text_column]):
        value = values[0]
        if not isinstance(value, str):
            raise DataError(f"{p}:{line}: column {text_column!r} must be a string, found {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{p}:{line}: empty text in column {text_column!r}")
        texts.append(value.strip())
    if not texts:
        raise DataError(f"{p}: no data rows")
    return LabeledData(labels=np.zeros(len(texts), dtype=np.int64), class_names=[DOCUMENT], texts=texts, source=str(p))


# ---------------------------------------------------------------------------- model folder


def decoder_path(model: str) -> Path:
    """The folder of the task's decoder (`task.model`, or the bundled MiniLM), checked
    without loading: config.json of a causal-LM architecture, intact weights, a tokenizer."""
    if not model:
        path = bundled_model_path()
        return check_decoder_folder(path, f"task.model='' (the bundled all-MiniLM-L6-v2 at {path})")
    return check_decoder_folder(model, f"task.model={model!r}")


def check_decoder_folder(path: str | os.PathLike[str], where: str) -> Path:
    p = Path(path)
    try:
        st = p.stat()
    except (OSError, ValueError):
        raise ModelError(f"{where}: no such folder (a from_pretrained folder: config.json and weights)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{where}: not a folder (a from_pretrained folder: config.json and weights)")
    model_type = _read_json(p / "config.json", where).get("model_type")
    _quiet_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{where}: config.json has model_type {model_type!r}, which AutoModelForCausalLM does not "
                         "build (text-generation needs a decoder: gpt2, llama, qwen2, mistral, phi, ... or bert)")
    found = next((name for name in WEIGHT_FILES if _regular(p / name) is not None), None)
    if found is None:
        raise ModelError(f"{where}: no weights there; expected one of {', '.join(WEIGHT_FILES)}")
    _check_weights(p, found, where)
    if not any(_regular(p / n) is not None for n in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{where}: no tokenizer there (tokenizer.json, vocab.txt, vocab.json or tokenizer.model)")
    return p


def load_kwargs(folder: Path) -> dict[str, Any]:
    """Extra `from_pretrained` arguments: a BERT checkpoint becomes a decoder (causal mask)."""
    return {"is_decoder": True} if _read_json(folder / "config.json", str(folder)).get("model_type") == "bert" else {}


@lru_cache(maxsize=2)
def tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer, padding on the right with its pad token (or EOS)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    folder = decoder_path(model)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"task.model={model!r}: the tokenizer has neither a pad token nor an EOS token "
                             "to pad with")
        tok.pad_token = tok.eos_token  # padding is masked out of the loss, so which id it is does not matter
    tok.padding_side = "right"  # positions are 0..n-1 per row (_CausalModule)
    return tok


def build_causal_lm(model: str, seed: int) -> nn.Module:
    """The pretrained decoder; weights its checkpoint lacks are initialised from `seed`
    (the same at the server and every site: the frozen fingerprint must match)."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    folder = decoder_path(model)
    torch.manual_seed(seed)
    # (model, loading info) with output_loading_info; transformers' annotation says a model
    loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **load_kwargs(folder))
    m: nn.Module = loaded[0]
    config: Any = m.config
    config.pad_token_id = tokenizer(model).pad_token_id
    config.use_cache = False
    # read by make_causal_view; a plain attribute survives the per-process deepcopy of the base
    setattr(m, NEW_MODULES, _new_leaf_modules(m, set(loaded[1].get("missing_keys", ()))))
    return m


def _new_leaf_modules(model: nn.Module, missing: set[str]) -> list[str]:
    """Leaf modules whose every own weight was missing from the checkpoint (a new head part):
    they train in full. A module holding a loaded or tied weight (the tied LM decoder) is left."""
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n not in missing}
    out = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own and not list(module.children()) and all(f"{name}.{n}" in missing and id(p) not in loaded
                                                      for n, p in own):
            out.append(name)
    return out


class _CausalModule(nn.Module):
    """(input_ids, attention_mask) -> logits (batch, vocab, tokens) for Opacus and
    CrossEntropyLoss; explicit per-row position ids (batch-1 buffers break per-sample grads)."""

    def __init__(self, model: nn.Module, bert: bool) -> None:
        super().__init__()
        self.model = model
        self.bert = bert
        self.criterion = DocumentLoss()  # task.trainer.train_local uses it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.bert else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=torch.arange(n, device=input_ids.device).repeat(b, 1), use_cache=False, **extra)
        logits: torch.Tensor = out.logits
        return logits.transpose(1, 2)


class DocumentLoss(nn.Module):
    """Mean over documents of each document's mean token loss (module docstring: why not
    the mean over the batch's tokens). A document with no target token contributes 0."""

    reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
        return (per_token.sum(dim=1) / counts).mean()


def make_causal_view(model: nn.Module, lora_r: int, lora_alpha: int) -> TrainView:
    """LoRA (peft's default attention targets for the architecture) + the new head modules.
    The model must already be on its device (Opacus issue 820)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    targets = TARGETS.get(model_type)
    if not targets:
        raise ModelError(f"model_type {model_type!r}: peft names no LoRA target modules for it")
    new = list(getattr(model, NEW_MODULES, []))
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(targets), lora_dropout=0.0,
                        task_type="CAUSAL_LM", modules_to_save=new or None)
    peft_model = get_peft_model(model, config)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    return TrainView(peft_model, _CausalModule(peft_model, model_type == "bert"), names, None)


# ---------------------------------------------------------------------------- tensors


def encode_documents(model: str, max_length: int, texts: list[str]) -> TensorDataset:
    """Documents -> (input_ids, attention_mask, labels): labels[t] = input_ids[t + 1] where
    that token is real, else -100 (padding, the last position). Truncated to max_length."""
    enc = tokenizer(model)(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return TensorDataset(ids, mask, next_token_labels(ids, mask))


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return labels


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def token_nll(module: nn.Module, dataset: TensorDataset, device: torch.device,
              batch_size: int = 16) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of target tokens) over `dataset`."""
    module.to(device)
    was_training = module.training
    module.train(False)
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        ids, mask, labels = (t.to(device) for t in batch)
        logits = module(ids, mask)
        total += float(F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    module.train(was_training)
    return total, count


def perplexity_metrics(total_nll: float, tokens: int) -> dict[str, float]:
    """loss = mean NLL per token (nats), perplexity = exp(loss)."""
    if tokens <= 0:
        raise DataError("the held-out documents have no target token (each needs at least two tokens)")
    loss = total_nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def export_adapter(model_name: str, view: TrainView, out: Path) -> Path:
    """The adapter (peft `save_pretrained`), the tokenizer and how to load the base."""
    out.mkdir(parents=True, exist_ok=True)
    save = getattr(view.model, "save_pretrained", None)
    if save is None:
        raise ModelError("text-generation export: the trained model is not a peft model")
    view.model.cpu()
    save(str(out))
    tokenizer(model_name).save_pretrained(out)
    folder = decoder_path(model_name)
    (out / BASE_FILE).write_text(json.dumps({"base_model": str(folder), "load_kwargs": load_kwargs(folder)}, indent=2))
    return out
