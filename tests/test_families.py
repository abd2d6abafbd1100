"""Every sequence-classification family (task/families.py) in every trainable mode: a DP
local step through the site's own path (build_view, encode, train_local) changes exactly
the trainable weights, or the mode is refused with one line before anything starts; the
per-sample gradients fedshield registers with Opacus equal microbatch-of-one gradients;
and a tiny GPT-2 federation runs two DP rounds whose ledger audits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedshield.conf.config import Config
from fedshield.task.families import FAMILIES, MODES
from fedshield.task.model import ModelError, check_model_folder, frozen_fingerprint
from fedshield.task.pipeline import build_model, build_view, check_task, encode, pool_and_test, tokenizer
from fedshield.task.trainer import LocalPlan, train_local
from tests.helpers import synthetic_rows, tiny_overrides, write_csv

_COMMON = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=30522,
               max_position_embeddings=64, num_labels=2)


def _tiny_config(model_type: str):  # noqa: ANN202 - a transformers PretrainedConfig
    """2 layers, 32 wide, the bundled MiniLM tokenizer's vocabulary. GPT-2's config keeps
    its own lack of a pad_token_id (the model code sets one from the tokenizer)."""
    import transformers as tf

    decoder = dict(num_hidden_layers=2, num_key_value_heads=2, **_COMMON)
    return {
        "bert": lambda: tf.BertConfig(num_hidden_layers=2, **_COMMON),
        "roberta": lambda: tf.RobertaConfig(num_hidden_layers=2, pad_token_id=0,
                                            **{**_COMMON, "max_position_embeddings": 70}),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(num_hidden_layers=2, pad_token_id=0,
                                                   **{**_COMMON, "max_position_embeddings": 70}),
        "electra": lambda: tf.ElectraConfig(num_hidden_layers=2, embedding_size=16, **_COMMON),
        "distilbert": lambda: tf.DistilBertConfig(n_layers=2, dim=32, n_heads=2, hidden_dim=64, vocab_size=30522,
                                                  max_position_embeddings=64),
        "deberta-v2": lambda: tf.DebertaV2Config(num_hidden_layers=2, **_COMMON),
        "modernbert": lambda: tf.ModernBertConfig(num_hidden_layers=2, pad_token_id=0, bos_token_id=101,
                                                  eos_token_id=102, cls_token_id=101, sep_token_id=102, **_COMMON),
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=30522,
                                      bos_token_id=102, eos_token_id=102),
        "llama": lambda: tf.LlamaConfig(**decoder, bos_token_id=101, eos_token_id=102),
        "qwen2": lambda: tf.Qwen2Config(**decoder, bos_token_id=101, eos_token_id=102),
        "mistral": lambda: tf.MistralConfig(**decoder, bos_token_id=101, eos_token_id=102),
        "phi": lambda: tf.PhiConfig(**decoder, bos_token_id=101, eos_token_id=102),
    }[model_type]()


_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """model_type -> a from_pretrained folder of a tiny random model of that family (no head:
    the task adds one) with the bundled tokenizer, built once per session."""
    from transformers import AutoModel, AutoTokenizer

    from fedshield.task.model import bundled_model_path

    def make(model_type: str) -> Path:
        if model_type not in _FOLDERS:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            torch.manual_seed(0)
            AutoModel.from_config(_tiny_config(model_type)).save_pretrained(out)
            AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(out)
            _FOLDERS[model_type] = out
        return _FOLDERS[model_type]

    return make


def _cfg(folder: Path, data: Path, tmp_path: Path, mode: str, **extra: object) -> Config:
    return Config.load(tiny_overrides(folder, data, tmp_path, **{
        "training.trainable": mode, "training.last_layers": 1, "task.max_length": 8,
        "training.center_features": "false", **extra}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_dp_step_changes_exactly_the_trainable_weights_or_the_mode_is_refused(
        model_type, mode, family_folder, synthetic_csv, tmp_path):
    cfg = _cfg(family_folder(model_type), synthetic_csv, tmp_path, mode)
    if mode not in FAMILIES[model_type].modes:
        with pytest.raises(ModelError) as err:
            check_task(cfg)  # before the federation starts
        msg = str(err.value)
        assert "\n" not in msg and FAMILIES[model_type].name in msg and f"trainable={mode}" in msg
        assert msg.endswith("use training.trainable=" + " | ".join(FAMILIES[model_type].modes))
        return
    check_task(cfg)
    view = build_view(cfg)
    full_before = {k: v.clone() for k, v in view.model.state_dict().items()}
    frozen_before = frozen_fingerprint(view.model, view.trainable_names)
    pool, _ = pool_and_test(cfg)
    data = encode(cfg, view, pool.subset(np.arange(16)))
    # One Poisson step at q = 1 (16 records, expected batch 16): the per-sample path, once.
    plan = LocalPlan(epochs=1, batch_size=16, max_physical_batch_size=16, learning_rate=0.05, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_local(view.module, data, plan, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    assert result.spends == [(1.0, 1.0, 1)] and result.steps == 1
    # The first physical batch's memory (CPU: the estimate) covers at least the per-sample gradients.
    trainable_bytes = sum(p.numel() * p.element_size() for p in view.module.parameters() if p.requires_grad)
    assert result.batch_memory is not None and result.batch_memory[0] > 16 * trainable_bytes
    after = view.model.state_dict()
    changed = {k for k in after if not torch.equal(full_before[k], after[k])}
    # Noise reaches every trainable coordinate (a silent no-op would leave one put), and
    # nothing frozen moves.
    assert changed == set(view.trainable_names)
    assert frozen_fingerprint(view.model, view.trainable_names) == frozen_before
    heads = FAMILIES[model_type].head
    if mode == "head":
        assert {k.split(".", 1)[0] for k in view.trainable_names} == set(heads)
    if mode == "lora":
        assert any("lora_" in k for k in changed)
        assert all("lora_" in k or any(f".{h}." in k for h in (*heads, "pooler")) for k in changed)


def test_last_layers_suffix_on_cached_states_equals_the_full_model(family_folder, synthetic_csv, tmp_path):
    """RoBERTa and ELECTRA (heads that read the sequence, no pooler) through the cache."""
    for model_type in ("roberta", "electra"):
        cfg = _cfg(family_folder(model_type), synthetic_csv, tmp_path / model_type, "last_layers")
        view = build_view(cfg)
        part = pool_and_test(cfg)[0].subset(np.arange(6))
        cached = encode(cfg, view, part)
        ids = encode(cfg, build_view(cfg.with_values({"training.trainable": "all"})), part).tensors
        view.model.eval()
        view.module.eval()
        with torch.no_grad():
            full = view.model(input_ids=ids[0], attention_mask=ids[1]).logits
            via_cache = view.module(cached.tensors[0], cached.tensors[1])
        assert torch.allclose(full, via_cache, atol=1e-5), model_type


def test_gpt2_gets_its_pad_token_from_the_tokenizer(family_folder, synthetic_csv, tmp_path):
    folder = family_folder("gpt2")
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    cfg = _cfg(folder, synthetic_csv, tmp_path, "head")
    model = build_model(cfg)
    assert model.config.pad_token_id == tokenizer(cfg.task.model).pad_token_id == 0


def test_unknown_family_gets_the_generic_modes_and_a_clear_refusal(tmp_path, synthetic_csv):
    """OPT is not in the table: all and head (its `score`) and lora (peft's targets) work,
    last_layers is refused naming them."""
    from transformers import AutoModel, AutoTokenizer, OPTConfig

    from fedshield.task.model import bundled_model_path

    folder = tmp_path / "opt"
    torch.manual_seed(0)
    AutoModel.from_config(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                                    word_embed_proj_dim=32, vocab_size=30522, max_position_embeddings=64,
                                    pad_token_id=0)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(folder)
    with pytest.raises(ModelError, match=r"does not work for model_type 'opt' \(not in fedshield's family table\).*"
                                         r"use training.trainable=all \| head \| lora$"):
        check_task(_cfg(folder, synthetic_csv, tmp_path, "last_layers"))
    cfg = _cfg(folder, synthetic_csv, tmp_path, "head")
    check_task(cfg)
    assert {n.split(".", 1)[0] for n in build_view(cfg).trainable_names} == {"score"}


def test_a_model_type_without_a_sequence_classifier_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ModelError, match="model_type 'vit'; the text tasks fine-tune a model that "
                                         "AutoModelForSequenceClassification loads"):
        check_model_folder(tmp_path / "m")


def _per_sample_vs_microbatches(module: nn.Module, x: torch.Tensor) -> None:
    """Opacus' per-sample gradients (hooks) equal the gradient of each record alone."""
    from opacus import GradSampleModule

    import fedshield.privacy.dpsgd  # noqa: F401 - registers the samplers

    gsm = GradSampleModule(module, loss_reduction="sum")  # the loss below is a sum over records
    gsm(x).pow(2).sum().backward()
    for p in module.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (len(x), *p.shape)
    samples = {name: p.grad_sample.clone() for name, p in module.named_parameters()}
    gsm.zero_grad(set_to_none=True)
    gsm._close()
    for i in range(len(x)):
        module.zero_grad(set_to_none=True)
        module(x[i : i + 1]).pow(2).sum().backward()
        for name, p in module.named_parameters():
            assert torch.allclose(samples[name][i], p.grad, atol=1e-5, rtol=1e-4), name


def test_layer_norm_without_bias_and_llama_rms_norm_per_sample_gradients():
    from opacus import GradSampleModule
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fedshield.privacy.dpsgd import register_rms_norm

    register_rms_norm(LlamaRMSNorm)
    # fedshield's samplers, not Opacus' functorch fallback (which would pass this test too)
    assert GradSampleModule.GRAD_SAMPLERS[LlamaRMSNorm].__module__ == "fedshield.privacy.dpsgd"
    assert GradSampleModule.GRAD_SAMPLERS[nn.LayerNorm].__module__ == "fedshield.privacy.dpsgd"
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    for norm in (nn.LayerNorm(8, bias=False), LlamaRMSNorm(8, eps=1e-6)):
        with torch.no_grad():
            norm.weight.add_(torch.randn(8) * 0.1)  # not all ones: the gradient depends on it
        _per_sample_vs_microbatches(nn.Sequential(nn.Linear(8, 8), norm, nn.Linear(8, 3)), x)


@pytest.mark.e2e
@pytest.mark.parametrize("model_type, mode", [("gpt2", "lora"), ("llama", "head"), ("deberta-v2", "all")])
def test_two_sites_two_dp_rounds_of_a_family_and_the_ledger_audits(model_type, mode, family_folder, tmp_path):
    """A decoder with LoRA, a decoder with its RMSNorms and only its head training, an
    encoder without a prefix cache training in full: the whole federation, not one step."""
    import fedshield
    from fedshield.simulations.simulate import run_simulation

    data = write_csv(tmp_path / "topics.csv", synthetic_rows(160, seed=2))  # 60 records a site: a short run
    extra = {"federation.num_sites": 2, "privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 100,
             "privacy.target_epsilon": 100, "training.local_epochs": 1}
    cfg = _cfg(family_folder(model_type), data, tmp_path, mode, **extra)
    run = run_simulation(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["trained"] == 2
    entries = [json.loads(line) for line in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert sorted({(e["site"], e["round"]) for e in entries if e["release"] == "dp-sgd"}) == [
        ("site-0", 1), ("site-0", 2), ("site-1", 1), ("site-1", 2)]
    assert fedshield.audit(run, write_report=False).ok
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["model_type"] == model_type
    if model_type in ("gpt2", "llama"):  # decoders classify from the last non-pad token
        assert saved["pad_token_id"] == 0


def test_a_decoder_folder_with_a_head_of_another_size_is_refused_up_front(tmp_path, synthetic_csv):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from fedshield.task.model import bundled_model_path

    folder = tmp_path / "gpt2-3"
    config = _tiny_config("gpt2")
    config.num_labels, config.pad_token_id = 3, 0
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(folder)
    with pytest.raises(ModelError, match="its classification head has 3 outputs but the task has 2 classes"):
        check_task(_cfg(folder, synthetic_csv, tmp_path, "head"))


@pytest.mark.parametrize("model_type", ["gpt2", "modernbert", "llama"])
def test_ghost_clipping_trains_the_families_with_their_own_samplers(model_type, family_folder, synthetic_csv, tmp_path):
    """grad_sample_mode=ghost: no tied weights in a sequence classifier, and the layers
    without a norm sampler (GPT-2's Conv1D, a bias-free LayerNorm, Llama's RMSNorm) fall
    back to per-sample gradients; every weight still moves."""
    cfg = _cfg(family_folder(model_type), synthetic_csv, tmp_path, "all", **{"training.grad_sample_mode": "ghost"})
    view = build_view(cfg)
    before = {k: v.copy() for k, v in view.trainable_state().items()}  # numpy views share the weights
    data = encode(cfg, view, pool_and_test(cfg)[0].subset(np.arange(16)))
    plan = LocalPlan(epochs=1, batch_size=16, max_physical_batch_size=16, learning_rate=0.05, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    result = train_local(view.module, data, plan, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    after = view.trainable_state()
    assert result.spends == [(1.0, 1.0, 1)]
    assert not [k for k in after if np.array_equal(before[k], after[k])]


def test_simulate_refuses_an_unsupported_mode_before_anything_starts(family_folder, synthetic_csv, tmp_path):
    from fedshield.simulations.simulate import run_simulation

    cfg = _cfg(family_folder("llama"), synthetic_csv, tmp_path, "last_layers")
    with pytest.raises(ModelError, match=r"trainable=last_layers does not work for Llama.*all \| lora \| head$"):
        run_simulation(cfg)
    assert not (tmp_path / "runs").exists()  # no run directory, no Ray
