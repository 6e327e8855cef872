"""split_model: at zero noise the split forward equals the unsplit model (BERT, RoBERTa, GPT-2, Llama; k = 0, 1, 2)."""

import copy

import pytest
import torch

from hf_ewtune.errors import PrivacyConfigError, UnsupportedModuleError
from hf_ewtune.sap import split_model
from hf_ewtune.testing import tiny_bert, tiny_gpt2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ATOL = 1e-5


def _batch(seed=0, vocab=200, b=3, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0  # right padding
    return ids, mask


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaForSequenceClassification(cfg)


MODELS = {
    "bert": lambda: tiny_bert(num_layers=3),
    "roberta": _roberta,
    "gpt2": lambda: tiny_gpt2(num_layers=3),
    "llama": _llama,
}


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_forward_equals_full_model(name, k):
    model = MODELS[name]().eval()
    ids, mask = _batch()
    bottom, top = split_model(model, split_layer=k)
    with torch.no_grad():
        h = bottom(input_ids=ids, attention_mask=mask) * mask.unsqueeze(-1)  # the customer zeroes padding
        out = top(inputs_embeds=h, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    if out.dim() == 3:  # LM logits: compare real positions (padding queries are never read)
        sel = mask.bool()
        out, ref = out[sel], ref[sel]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("k", [0, 2])
def test_gpt2_classifier_left_padding_with_position_ids(k):
    model = tiny_gpt2(num_layers=3, num_labels=2).eval()
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0  # left padding: the last position is always real
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    bottom, top = split_model(model, split_layer=k)
    with torch.no_grad():
        h = bottom(input_ids=ids, attention_mask=mask, position_ids=pos) * mask.unsqueeze(-1)
        out = top(inputs_embeds=h, attention_mask=mask, position_ids=pos).logits
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("k", [0, 1])
def test_split_loss_and_lora_gradients_equal(k):
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(num_layers=3).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                     modules_to_save=["classifier"], init_lora_weights=False)
    bottom, top = split_model(base, split_layer=k)
    full_cfg = copy.deepcopy(cfg)
    full_cfg.layers_to_transform = list(range(k, 3))  # the bottom blocks carry no adapter
    full_cfg.layers_pattern = "layer"
    torch.manual_seed(1)
    full = get_peft_model(copy.deepcopy(base), full_cfg)
    torch.manual_seed(1)
    top = get_peft_model(top, cfg)
    # copy the full model's LoRA weights of blocks k.. into the top, whose block i is the full model's block k+i
    fstate = {n: p for n, p in full.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in top.named_parameters():
            if "lora_" in n:
                parts = n.split(".")
                i = parts.index("layer") + 1
                parts[i] = str(int(parts[i]) + k)
                p.copy_(fstate[".".join(parts)])
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1])
    h = bottom(input_ids=ids, attention_mask=mask) * mask.unsqueeze(-1)
    lt = top(inputs_embeds=h, attention_mask=mask, labels=labels).loss
    lf = full(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(lt, lf, atol=ATOL, rtol=0)
    lt.backward()
    lf.backward()
    fgrads = {n: p.grad for n, p in full.named_parameters() if "lora_" in n}
    n_checked = 0
    for n, p in top.named_parameters():
        if "lora_" in n:
            parts = n.split(".")
            i = parts.index("layer") + 1
            parts[i] = str(int(parts[i]) + k)
            torch.testing.assert_close(p.grad, fgrads[".".join(parts)], atol=1e-5, rtol=1e-4)
            n_checked += 1
    assert n_checked == 4 * (3 - k)  # query + value, A + B, per remaining block


def test_bottom_is_frozen_and_original_untouched():
    model = tiny_bert(num_layers=3)
    n_before = len(model.bert.encoder.layer)
    bottom, top = split_model(model, split_layer=2)
    assert all(not p.requires_grad for p in bottom.parameters())
    assert len(model.bert.encoder.layer) == n_before
    assert len(bottom.module.encoder.layer) == 2 and len(top.bert.encoder.layer) == 1
    assert bottom.hidden_size == 32 and bottom.embedding_matrix.shape == (200, 32)


def test_top_rejects_input_ids_at_k_ge_1():
    _, top = split_model(tiny_bert(num_layers=3), split_layer=1)
    with pytest.raises(ValueError, match="inputs_embeds"):
        top(input_ids=torch.tensor([[2, 3]]))


@pytest.mark.parametrize("k", [-1, 3, 1.5])
def test_bad_split_layer(k):
    with pytest.raises(PrivacyConfigError, match="split_layer"):
        split_model(tiny_bert(num_layers=3), split_layer=k)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedModuleError, match="unsupported architecture"):
        split_model(torch.nn.Linear(3, 3), split_layer=0)
