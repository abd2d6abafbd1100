"""text-generation (task/causal_lm.py): LoRA on a decoder under DP-SGD, one document = one
sample, perplexity evaluation, the adapter export that peft loads for generate().

Tiny random GPT-2 / Llama decoders (2 layers, width 32) with the bundled tokenizer, built in
code in tmp dirs; one e2e 2-site 2-round DP simulation whose ledger audits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedshield.conf.config import Config
from fedshield.task import causal_lm
from fedshield.task.data import DataError
from fedshield.task.model import ModelError, bundled_model_path
from fedshield.task.trainer import LocalPlan, train_local
from tests.helpers import synthetic_rows

WIDTH = 32


def _tiny_decoder(out: Path, family: str) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    model: nn.Module
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=WIDTH, n_layer=2, n_head=2,
                                           n_positions=64, bos_token_id=tok.cls_token_id,
                                           eos_token_id=tok.sep_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=WIDTH, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_decoder(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def documents_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text, "topic": label}) + "\n"
                            for text, label in synthetic_rows(240, seed=3)))
    return path


def test_documents_become_next_token_labels_with_padding_masked(tiny_gpt2):
    ds = causal_lm.encode_documents(str(tiny_gpt2), 12, ["sunny rain", "stock shares bank profit market"])
    ids, mask, labels = ds.tensors
    assert ids.shape == mask.shape == labels.shape == (2, 12)
    for row in range(2):
        n = int(mask[row].sum())  # real tokens ([CLS] ... [SEP]), then padding
        assert labels[row, : n - 1].tolist() == ids[row, 1:n].tolist()  # position t predicts token t + 1
        assert (labels[row, n - 1:] == causal_lm.IGNORE_INDEX).all()  # the last real token and the padding


def test_a_long_document_is_truncated_to_one_sample(tiny_gpt2):
    long_doc = " ".join(["market"] * 500)
    ds = causal_lm.encode_documents(str(tiny_gpt2), 16, [long_doc, "sunny"])
    assert len(ds) == 2 and ds.tensors[0].shape == (2, 16)  # one record = one row, never chunks


def test_the_loss_is_a_mean_of_per_document_means():
    """Each document's loss is its own token mean: the other documents' lengths do not scale it
    (a batch-token mean would, and per-sample clipping would then not bound one record)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, -100, -100, -100, -100]])
    loss = causal_lm.DocumentLoss()(logits, labels)
    first = nn.functional.cross_entropy(logits[:1, :, :3], labels[:1, :3])
    second = nn.functional.cross_entropy(logits[1:, :, :1], labels[1:, :1])
    assert float(loss) == pytest.approx(float((first + second) / 2), rel=1e-6)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    class Uniform(nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ids.shape[0], 50, ids.shape[1])

    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    ds = TensorDataset(ids, mask, causal_lm.next_token_labels(ids, mask))
    total, tokens = causal_lm.token_nll(Uniform(), ds, torch.device("cpu"))
    assert tokens == 5 + 3 + 1
    metrics = causal_lm.perplexity_metrics(total, tokens)
    assert metrics["loss"] == pytest.approx(math.log(50)) and metrics["perplexity"] == pytest.approx(50.0)
    with pytest.raises(DataError, match="no target token"):
        causal_lm.perplexity_metrics(0.0, 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_weights_change_under_dp_and_one_document_is_one_sample(family, tiny_gpt2, tiny_llama):
    folder = tiny_gpt2 if family == "gpt2" else tiny_llama
    view = causal_lm.make_causal_view(causal_lm.build_causal_lm(str(folder), seed=1), lora_r=4, lora_alpha=8)
    assert view.trainable_names and all("lora_" in n for n in view.trainable_names)
    texts = [text for text, _ in synthetic_rows(24, seed=0)]
    ds = causal_lm.encode_documents(str(folder), 16, texts)
    assert len(ds) == len(texts)  # the sampler draws documents
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    plan = LocalPlan(epochs=1, batch_size=8, max_physical_batch_size=4, learning_rate=0.5, optimizer="sgd",
                     dp=True, noise_multiplier=0.5, max_grad_norm=1.0)
    result = train_local(view.module, ds, plan, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert result.spends == [(0.5, 1 / 3, 3)]  # q = 1 / ceil(24 / 8) over documents, 3 steps
    after = view.trainable_state()
    assert all(not np.array_equal(before[k], after[k]) for k in view.trainable_names)  # Opacus issue 820


def test_the_bundled_minilm_is_a_decoder_whose_new_head_trains_with_lora():
    model = causal_lm.build_causal_lm("", seed=1)
    assert type(model).__name__ == "BertLMHeadModel" and model.config.is_decoder
    view = causal_lm.make_causal_view(model, lora_r=4, lora_alpha=8)
    head = [n for n in view.trainable_names if "lora_" not in n]
    # the LM-head transform is not in the checkpoint: new weights, trained and saved with the adapter
    assert head and all(".cls.predictions.transform." in n and "modules_to_save" in n for n in head)
    assert not any("word_embeddings" in n or "decoder" in n for n in view.trainable_names)  # tied: frozen


def test_the_adapter_loads_with_peft_and_generates(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    view = causal_lm.make_causal_view(causal_lm.build_causal_lm(str(tiny_llama), seed=1), lora_r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in view.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # a trained adapter: it changes the output
    out = causal_lm.export_adapter(str(tiny_llama), view, tmp_path / "model")
    base_info = json.loads((out / causal_lm.BASE_FILE).read_text())
    base = AutoModelForCausalLM.from_pretrained(base_info["base_model"], **base_info["load_kwargs"])
    loaded = PeftModel.from_pretrained(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["sunny rain"], return_tensors="pt", return_token_type_ids=False)
    ids = enc["input_ids"]
    with torch.no_grad():
        expected = view.model(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
        generated = loaded.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_bad_settings_and_folders_fail_with_one_line(tmp_path, documents_jsonl):
    with pytest.raises(Exception, match="training.trainable='last_layers'.*lora"):
        Config.load(["task=text-generation", "training.trainable=last_layers"])
    with pytest.raises(Exception, match="training.grad_sample_mode='ghost'"):
        Config.load(["task=text-generation", "training.grad_sample_mode=ghost"])
    from transformers import BertConfig, BertModel

    enc = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(enc)
    (enc / "config.json").write_text((enc / "config.json").read_text().replace('"bert"', '"t5encoder"'))
    with pytest.raises(ModelError, match="model_type 't5encoder'"):
        causal_lm.decoder_path(str(enc))
    with pytest.raises(DataError, match="no field 'body'"):
        causal_lm.load_documents(documents_jsonl, "body")
    docs = causal_lm.load_documents(documents_jsonl)
    assert len(docs) == 240 and docs.class_names == [causal_lm.DOCUMENT]


@pytest.mark.e2e
def test_two_sites_two_rounds_dp_run_reports_perplexity_and_audits(tiny_gpt2, documents_jsonl, tmp_path):
    import fedshield
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.result import RunResult
    from fedshield.simulations.simulate import run_simulation

    cfg = Config.load([
        "task=text-generation", f"task.model={tiny_gpt2}", f"task.data_path={documents_jsonl}",
        "task.max_length=16", "task.test_fraction=0.25", "federation.num_sites=2", "federation.rounds=2",
        "training.batch_size=16", "training.max_physical_batch_size=16", "training.learning_rate=0.5",
        "privacy.delta=1e-3", "privacy.target_epsilon=8", f"output.dir={tmp_path / 'runs'}",
        "simulation.client_cpus=1",
    ])
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["trained"] == 2
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) and "accuracy" not in r for r in rows)
    result = RunResult.read(run)
    assert result.final_perplexity == rows[-1]["perplexity"]
    assert "perplexity" in result.table() and "perplexity" in (run / "report.md").read_text()
    audit = fedshield.audit(run, write_report=False)
    assert audit.ok and set(audit.epsilon) == {"site-0", "site-1"}
    assert all(0 < eps <= 8 for eps in audit.epsilon.values())
    assert (run / "model" / "adapter_config.json").is_file() and (run / "plots" / "accuracy.png").is_file()
