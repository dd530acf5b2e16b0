"""HeLU's public API: the functional, the module, argument checks, and transformers integration."""

import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Wav2Vec2Config, Wav2Vec2ForSequenceClassification
from transformers.activations import ACT2CLS, ACT2FN, get_activation

import hf_helu
from hf_helu import HeLU, activation_name, helu, parse_activation_name

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def reference_grad(x: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """HeLU's gradient written independently of the library: pass where x > -alpha (in x's dtype)."""
    passes = x > torch.tensor(-alpha, dtype=x.dtype)
    return torch.where(passes, grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_forward_is_relu_and_backward_matches_reference(dtype, alpha):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 53, generator=gen) * 0.2).to(dtype).requires_grad_()
    grad = torch.randn(37, 53, generator=gen).to(dtype)
    y = helu(x, alpha)
    assert y.dtype == dtype
    assert torch.equal(y, torch.relu(x.detach()))
    y.backward(grad)
    expected = reference_grad(x.detach(), grad, alpha)
    assert torch.equal(x.grad, expected)
    # The band (-alpha, 0] is where HeLU differs from ReLU: non-empty here, so the test has teeth.
    band = (x.detach() <= 0) & (x.detach() > -alpha)
    assert band.any() and (x.grad[band] != 0).any()


def test_alpha_zero_is_relu_gradient():
    x = torch.randn(1000, dtype=torch.float64)
    x[:10] = 0.0  # ReLU's gradient at exactly 0 is 0
    grad = torch.randn(1000, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    helu(a, 0.0).backward(grad)
    torch.relu(b).backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_gradcheck_away_from_kinks():
    x = torch.randn(64, dtype=torch.float64)
    x = torch.where(x.abs() < 0.2, x.sign() * 0.3, x)  # keep clear of 0 and of -alpha
    assert torch.autograd.gradcheck(lambda t: helu(t, 0.05), (x.requires_grad_(),))


def test_no_autograd_node_without_grad_or_in_eval():
    x = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        assert helu(x).grad_fn is None
    assert helu(torch.randn(8)).grad_fn is None
    module = HeLU().eval()
    y = module(x)
    assert y.grad_fn is not None and "Relu" in type(y.grad_fn).__name__
    module.train()
    assert "HeLU" in type(module(x).grad_fn).__name__


@pytest.mark.parametrize(
    ("alpha", "error"),
    [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)],
)
def test_bad_alpha_is_named(alpha, error):
    for make in (lambda: HeLU(alpha), lambda: helu(torch.randn(3, requires_grad=True), alpha)):
        with pytest.raises(error, match="alpha") as info:
            make()
        assert repr(alpha) in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_input_is_rejected(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        helu(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match=str(dtype)):
        HeLU()(torch.zeros(3, dtype=dtype))


def test_nan_and_inf_behave_like_relu():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.01, 1.0])
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = helu(a, 0.0), torch.relu(b)
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_activation_names_round_trip():
    assert activation_name() == "helu"
    assert activation_name(0.1) == "helu_0.1"
    for alpha in [0.0, 0.05, 0.1, 0.5, 1e-3, 0.123456789]:
        assert parse_activation_name(activation_name(alpha)) == alpha
    assert parse_activation_name("gelu") is None
    with pytest.raises(ValueError, match="helu_abc"):
        parse_activation_name("helu_abc")
    with pytest.raises(ValueError, match="alpha"):
        parse_activation_name("helu_-1")


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
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act=hidden_act, num_labels=3,
    )  # fmt: skip
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


def test_inside_autocast_keeps_the_autocast_dtype():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = linear(x)
        y = helu(z, 0.05)
    assert z.dtype == y.dtype == torch.bfloat16
    assert torch.equal(y, torch.relu(z))
    z.retain_grad()
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(z.grad, reference_grad(z.detach(), grad, 0.05))
