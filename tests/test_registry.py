"""HeLU in transformers (hf_helu.registry): the ACT2FN/ACT2CLS entries, and tiny models built, trained and
reloaded from a ``hidden_act="helu..."`` config."""

import subprocess
import sys

import pytest
import torch
from helpers import tiny_bert_config
from transformers import BertForSequenceClassification, Wav2Vec2Config, Wav2Vec2ForSequenceClassification
from transformers.activations import ACT2CLS, ACT2FN, get_activation

import hf_helu
from hf_helu import HeLU


def test_registered_in_transformers_tables():
    assert ACT2CLS["helu"] is HeLU
    assert isinstance(ACT2FN["helu"], HeLU) and ACT2FN["helu"].alpha == 0.05
    assert ACT2FN["helu_0.25"].alpha == 0.25
    assert "helu_0.25" in ACT2FN and "helu" in ACT2FN and "nope" not in ACT2FN
    assert get_activation("helu_0.3").alpha == 0.3
    with pytest.raises(KeyError):
        ACT2FN["nope"]
    before = {k: dict.get(ACT2FN, k) for k in ACT2FN}
    hf_helu.register()  # idempotent
    assert {k: dict.get(ACT2FN, k) for k in ACT2FN} == before
    assert isinstance(ACT2FN["gelu"], torch.nn.Module) and not isinstance(ACT2FN["gelu"], HeLU)


def test_register_refuses_to_clobber_another_helu():
    script = (
        "from transformers import activations\n"
        "activations.ACT2CLS['helu'] = activations.GELUActivation\n"
        "try:\n    import hf_helu\nexcept RuntimeError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("REFUSED") and "helu" in out


def _tiny_bert(hidden_act: str) -> BertForSequenceClassification:
    config = tiny_bert_config(
        vocab_size=99, num_attention_heads=4, max_position_embeddings=512, hidden_act=hidden_act, num_labels=3
    )
    return BertForSequenceClassification(config)


def _tiny_wav2vec2(hidden_act: str) -> Wav2Vec2ForSequenceClassification:
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_act=hidden_act,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=3, feat_extract_activation="helu_0.1",
    )  # fmt: skip
    return Wav2Vec2ForSequenceClassification(config)


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        (_tiny_bert, lambda g: {"input_ids": torch.randint(0, 99, (6, 12), generator=g)}),
        (_tiny_wav2vec2, lambda g: {"input_values": torch.randn(6, 800, generator=g)}),
    ],
    ids=["bert", "wav2vec2"],
)
def test_tiny_models_train_and_round_trip(build, inputs, tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build("helu_0.1")
    helus = [m for m in model.modules() if isinstance(m, HeLU)]
    assert helus and all(m.alpha == 0.1 for m in helus)
    batch = inputs(gen)
    labels = torch.randint(0, 3, (6,), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.hidden_act == "helu_0.1"
    assert [m.alpha for m in reloaded.modules() if isinstance(m, HeLU)] == [m.alpha for m in helus]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_helu_model_equals_relu_model_forward():
    torch.manual_seed(0)
    helu_model = _tiny_bert("helu").eval()
    relu_model = _tiny_bert("relu").eval()
    relu_model.load_state_dict(helu_model.state_dict())
    ids = torch.randint(0, 99, (4, 10))
    for m in (helu_model, relu_model):
        m.train()  # train mode runs HeLU's autograd path; dropout is switched off below
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    assert torch.equal(helu_model(input_ids=ids).logits, relu_model(input_ids=ids).logits)


def test_loading_helu_checkpoint_without_plugin_fails_with_key_error(tmp_path):
    _tiny_bert("helu").save_pretrained(tmp_path)
    script = (
        "import sys\nfrom transformers import AutoModelForSequenceClassification\n"
        f"try:\n    AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r})\n"
        "except KeyError as e:\n    print('KEYERROR', e)\n"
        "assert 'hf_helu' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "KEYERROR" in out and "helu" in out


def test_malformed_alpha_names_are_not_in_the_table():
    for name in ("helu_1_0", "helu_ 0.1", "helu_nan"):
        assert name not in ACT2FN
        with pytest.raises(ValueError, match="plain decimal"):
            ACT2FN[name]
    assert ACT2FN["helu_1e-05"].alpha == 1e-05
