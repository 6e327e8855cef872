"""The pooled classification head: pooling, checkpoint detection, per-example gradients, save and reload."""

from __future__ import annotations

import json

import pytest
import torch

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.recipes.pooling import PooledSequenceClassifier, sentence_transformers_pooling
from hf_ewtune.testing import tiny_bert
from tests.test_clipping_oracle import bert_batch, cls_loss, expected_clipped_sum, loop_grads


def pooled(pooling: str = "mean", normalize: bool = True, dtype=torch.float64) -> PooledSequenceClassifier:
    model = PooledSequenceClassifier(encoder=tiny_bert(seed=3).bert, num_labels=2, pooling=pooling, normalize=normalize)
    with torch.no_grad():  # the head starts at zero; give it weights so every parameter gets a gradient
        model.classifier.weight.normal_(0, 0.5)
    return model.to(dtype).train()


def test_mean_pooling_ignores_padding():
    model = pooled().eval()
    ids = torch.tensor([[2, 17, 25, 40, 3]])
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded = model(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(short, padded, rtol=1e-9, atol=1e-9)


def test_pool_values_mean_cls_and_normalisation():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    model = PooledSequenceClassifier(encoder=tiny_bert().bert, num_labels=2, pooling="mean", normalize=False)
    torch.testing.assert_close(model.pool(hidden, mask), torch.tensor([[2.0, 2.0]]))
    model.normalize = True
    torch.testing.assert_close(model.pool(hidden, mask), torch.tensor([[2.0, 2.0]]) / 8 ** 0.5)
    model.pooling, model.normalize = "cls", False
    torch.testing.assert_close(model.pool(hidden, mask), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="pooling"):
        PooledSequenceClassifier(encoder=tiny_bert().bert, num_labels=2, pooling="max")


def test_head_starts_at_zero_and_loss_is_cross_entropy():
    model = PooledSequenceClassifier(encoder=tiny_bert().bert, num_labels=3, pooling="mean")
    assert model.classifier.weight.abs().sum() == 0 and model.config.num_labels == 3
    batch = bert_batch(b=3)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)


def test_sentence_transformers_pooling_detection(tmp_path):
    from hf_ewtune.data import minilm_path

    assert sentence_transformers_pooling(minilm_path()) == ("mean", True)
    assert sentence_transformers_pooling(tmp_path) is None
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    assert sentence_transformers_pooling(tmp_path) == ("cls", False)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_per_example_clipped_sum_matches_loop(pooling):
    model, batch = pooled(pooling), bert_batch(b=5)
    truth = loop_grads(model, batch, cls_loss)
    engine = ClippingEngine(model, max_grad_norm=0.1)
    engine.backward(cls_loss(model, batch))
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_lora_on_pooled_classifier_trains_adapters_and_head():
    from hf_ewtune.recipes.models import LoraSettings, apply_lora, lora_targets

    model = pooled(dtype=torch.float32)
    assert lora_targets(model) == (["query", "value"], ["classifier"])
    peft_model = apply_lora(model, settings=LoraSettings(r=2, alpha=4), task_type="SEQ_CLS")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)


def test_saved_lora_run_reloads_with_same_predictions(tmp_path):
    from hf_ewtune.data import minilm_path
    from hf_ewtune.recipes.models import LoraSettings, apply_lora
    from hf_ewtune.recipes.pooling import HEAD_FILE, build_pooled_classifier, load_pooled_classifier

    torch.manual_seed(0)
    model = build_pooled_classifier(str(minilm_path()), num_labels=2, pooling="mean", normalize=True)
    peft_model = apply_lora(model, settings=LoraSettings(r=2, alpha=4), task_type="SEQ_CLS")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path))
    (tmp_path / HEAD_FILE).write_text(json.dumps(dict(model.head_settings(), base_model="all-MiniLM-L6-v2")))
    batch = bert_batch(b=3, vocab=1000)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = load_pooled_classifier(tmp_path)
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert expected.abs().max() > 1e-3  # the trained head is not the zero initialisation
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_head_learning_rate_groups():
    from hf_ewtune.recipes.heads import POOLED_HEAD_LEARNING_RATE, head_optimizer

    def _optimizer(model, lr=5e-3, head_lr=None):
        return head_optimizer(model, learning_rate=lr, head_learning_rate=head_lr)

    opt = _optimizer(pooled(dtype=torch.float32))
    assert [g["lr"] for g in opt.param_groups] == [5e-3, POOLED_HEAD_LEARNING_RATE]
    head_ids = {id(p) for p in opt.param_groups[1]["params"]}
    model = pooled(dtype=torch.float32)
    opt = _optimizer(model)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(head_ids) == 2
    assert _optimizer(tiny_bert()) is None  # the model's own head: one learning rate, the Trainer's AdamW
    opt = _optimizer(tiny_bert(), head_lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 1e-2]


def test_trainer_scales_pooled_loss_for_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = pooled(dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs is False  # so the logged loss is a per-example mean, not GA times it


def test_default_model_is_mean_pooled_and_named_by_hub_id():
    from hf_ewtune.recipes.models import LoraSettings, apply_lora
    from hf_ewtune.recipes.heads import load_classifier

    model, tokenizer, gguf = load_classifier("all-MiniLM-L6-v2", num_labels=2)
    assert isinstance(model, PooledSequenceClassifier) and (model.pooling, model.normalize) == ("mean", True)
    assert not gguf and tokenizer.pad_token is not None
    peft_model = apply_lora(model, settings=LoraSettings(), task_type="SEQ_CLS")
    # the adapter config and the card name the Hub model, not this machine's site-packages folder
    assert peft_model.peft_config["default"].base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    own_head, _, _ = load_classifier("all-MiniLM-L6-v2", num_labels=2, pooling="model")
    assert type(own_head).__name__ == "BertForSequenceClassification"
    with pytest.raises(ValueError, match="pooling"):
        load_classifier("all-MiniLM-L6-v2", num_labels=2, pooling="max")


def test_hub_id_without_network_declares_no_pooling(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sentence_transformers_pooling("sentence-transformers/some-model-not-cached") is None


def test_saved_full_fine_tune_reloads_with_same_predictions(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_ewtune.data import minilm_path
    from hf_ewtune.recipes.pooling import HEAD_FILE, build_pooled_classifier, load_pooled_classifier

    torch.manual_seed(0)
    model = build_pooled_classifier(str(minilm_path()), num_labels=2, pooling="mean", normalize=True)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.encoder.encoder.layer[0].attention.self.query.weight.mul_(1.5)  # differs from the checkpoint
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    Trainer(model=model, args=args).save_model(str(tmp_path))  # not a PreTrainedModel: model.safetensors
    (tmp_path / HEAD_FILE).write_text(json.dumps(dict(model.head_settings(), base_model="all-MiniLM-L6-v2")))
    batch = bert_batch(b=3, vocab=1000)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = load_pooled_classifier(tmp_path)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_head_choices_match_pooling_modes():
    from hf_ewtune.recipes.heads import HEAD_CHOICES
    from hf_ewtune.recipes.pooling import POOLINGS

    assert HEAD_CHOICES == ("auto", "model") + POOLINGS
