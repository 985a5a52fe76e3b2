"""Unit tests for the reference models in `trainer.models`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import CNN, MLP, GRUClassifier, TinyGPT, TransformerClassifier
from trainer.models.attention import SelfAttention
from trainer.models.sequence import sequence_shape, to_sequence

CLASSIFIERS = [MLP, CNN, GRUClassifier, TransformerClassifier]
# digits, MNIST-1D, synthetic vectors
SHAPES = [(1, 8, 8), (1, 40), (64,)]
# Small sizes keep the file fast; defaults are exercised by the default-args test.
SMALL = {
    MLP: {"hidden": (32, 32)},
    CNN: {"channels": (4, 8), "hidden": 16},
    GRUClassifier: {"hidden": 16},
    TransformerClassifier: {"dim": 16, "depth": 2, "heads": 2},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The trainer's single loss for classification and language modelling alike.
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _assert_all_grads_finite_and_used(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ----------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
def test_classifier_shape_and_grads(cls, shape):
    model = cls(input_shape=shape, num_classes=7, **SMALL[cls])
    x = torch.randn(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert logits.dtype == torch.float32
    # FSDP2 warns if the root returns a view of an internal tensor.
    assert logits._base is None
    _loss(logits, torch.randint(0, 7, (5,))).backward()
    _assert_all_grads_finite_and_used(model)


@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
def test_classifier_default_args_on_digits(cls):
    model = cls(input_shape=(1, 8, 8), num_classes=10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
def test_input_shape_as_list(cls):
    model = cls(input_shape=[1, 8, 8], num_classes=4, **SMALL[cls])
    assert model.input_shape == (1, 8, 8)
    assert isinstance(model.input_shape, tuple)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_mlp_hidden_and_dropout_modules():
    model = MLP(input_shape=(64,), num_classes=3, hidden=(10, 20, 30), dropout=0.25)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (64, 10),
        (10, 20),
        (20, 30),
        (30, 3),
    ]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.25 for d in drops)


@pytest.mark.parametrize(
    ("shape", "conv", "pool", "other"),
    [
        ((1, 8, 8), nn.Conv2d, nn.MaxPool2d, nn.Conv1d),
        ((1, 40), nn.Conv1d, nn.MaxPool1d, nn.Conv2d),
        ((64,), nn.Conv1d, nn.MaxPool1d, nn.Conv2d),
    ],
    ids=["digits", "mnist1d", "vector"],
)
def test_cnn_picks_conv_dimension(shape, conv, pool, other):
    model = CNN(input_shape=shape, num_classes=10)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(conv) == 2
    assert kinds.count(pool) == 2
    assert other not in kinds
    convs = [m for m in model.modules() if isinstance(m, conv)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert all(set(c.kernel_size) == {3} and set(c.padding) == {1} for c in convs)


@pytest.mark.parametrize(
    ("shape", "flat"),
    [((1, 8, 8), 64 * 2 * 2), ((1, 40), 64 * 10), ((3, 16, 12), 64 * 4 * 3), ((64,), 64 * 16)],
    ids=str,
)
def test_cnn_flattened_size_from_input_shape(shape, flat):
    model = CNN(input_shape=shape, num_classes=10)
    first_fc = next(m for m in model.classifier if isinstance(m, nn.Linear))
    assert first_fc.in_features == flat


# ----------------------------------------------------------------------------- batch norm


def _lenet_as_written_before(shape: tuple[int, ...]) -> nn.Module:
    """The CNN without batch norm, written out with torch modules (channels 4, 8, hidden 16)."""
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if len(shape) == 3 else (nn.Conv1d, nn.MaxPool1d)
    model = nn.Module()
    model.features = nn.Sequential(
        conv(shape[0], 4, 3, padding=1), nn.ReLU(), pool(2),
        conv(4, 8, 3, padding=1), nn.ReLU(), pool(2),
    )  # fmt: skip
    flat = 8 * math.prod(s // 4 for s in shape[1:])
    model.classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(flat, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 7)
    )
    return model


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)], ids=str)
def test_default_models_are_the_models_without_batch_norm(shape):
    """batch_norm defaults to off and leaves the models as they were: the same parameter names,
    drawn in the same order from the seed, so the same outputs."""
    torch.manual_seed(0)
    reference = _lenet_as_written_before(shape)
    torch.manual_seed(0)
    cnn = CNN(input_shape=shape, num_classes=7, channels=(4, 8), hidden=16)
    torch.manual_seed(0)
    mlp_reference = nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(shape), 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 7)
    )
    torch.manual_seed(0)
    mlp = MLP(input_shape=shape, num_classes=7, hidden=(32,))
    x = torch.randn(5, *shape)
    for model, ref in ((cnn, reference), (mlp.net, mlp_reference)):
        want = ref.state_dict()
        assert list(model.state_dict()) == list(want)
        for name, value in model.state_dict().items():
            assert torch.equal(value, want[name]), name
    assert torch.equal(cnn(x), reference.classifier(reference.features(x)))
    assert torch.equal(mlp(x), mlp_reference(x))


@pytest.mark.parametrize(
    ("shape", "norm"),
    [((1, 8, 8), nn.BatchNorm2d), ((1, 40), nn.BatchNorm1d), ((64,), nn.BatchNorm1d)],
    ids=["digits", "mnist1d", "vector"],
)
def test_cnn_batch_norm_after_each_conv_before_its_relu(shape, norm):
    model = CNN(input_shape=shape, num_classes=7, channels=(4, 8), hidden=16, batch_norm=True)
    kinds = [type(m) for m in model.features]
    conv = nn.Conv2d if len(shape) == 3 else nn.Conv1d
    pool = nn.MaxPool2d if len(shape) == 3 else nn.MaxPool1d
    assert kinds == [conv, norm, nn.ReLU, pool] * 2
    assert [m.num_features for m in model.features if isinstance(m, norm)] == [4, 8]
    assert all(m.bias is None for m in model.features if isinstance(m, conv))  # BN's beta
    assert not any(isinstance(m, norm) for m in model.classifier)  # the head tp shards
    logits = model(torch.randn(5, *shape))
    assert logits.shape == (5, 7) and logits._base is None
    _loss(logits, torch.randint(0, 7, (5,))).backward()
    _assert_all_grads_finite_and_used(model)


def test_mlp_batch_norm_after_each_hidden_linear_before_its_relu():
    model = MLP(input_shape=(8, 8), num_classes=7, hidden=(16, 12), batch_norm=True)
    kinds = [type(m) for m in model.net]
    hidden = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert kinds == [nn.Flatten, *hidden, *hidden, nn.Linear]
    assert [m.num_features for m in model.net if isinstance(m, nn.BatchNorm1d)] == [16, 12]
    assert [m.bias is None for m in model.net if isinstance(m, nn.Linear)] == [True, True, False]
    logits = model(torch.randn(5, 8, 8))
    assert logits.shape == (5, 7)
    _loss(logits, torch.randint(0, 7, (5,))).backward()
    _assert_all_grads_finite_and_used(model)


def test_cnn_rejects_input_too_small_for_pooling():
    with pytest.raises(ValueError):
        CNN(input_shape=(1, 3, 3), num_classes=10)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((2, 5, 3), (5, 6)), ((3, 40), (40, 3)), ((64,), (64, 1))],
    ids=str,
)
def test_sequence_rule(shape, expected):
    assert sequence_shape(list(shape)) == expected
    x = torch.randn(4, *shape)
    seq = to_sequence(x)
    assert seq.shape == (4, *expected)
    if len(shape) == 3:  # token h holds row h of every channel, channel-major
        c, h, w = shape
        for ci in range(c):
            assert torch.equal(seq[:, 1, ci * w : (ci + 1) * w], x[:, ci, 1, :])
    elif len(shape) == 2:  # token l holds the C channel values at step l
        assert torch.equal(seq[:, 7, :], x[:, :, 7])
    else:
        assert torch.equal(seq[:, :, 0], x)


def test_sequence_models_use_sequence_rule():
    gru = GRUClassifier(input_shape=(2, 5, 3), num_classes=3)
    assert gru.gru.input_size == 6
    tf = TransformerClassifier(input_shape=(2, 5, 3), num_classes=3)
    assert tf.embed.in_features == 6
    assert tf.pos_emb.num_embeddings == 5


def test_gru_classifies_from_last_hidden_state():
    # With a single layer the head must see the final step's hidden state, so changing only
    # the last time step changes the logits, and the logits match head(gru_out[:, -1]).
    model = GRUClassifier(input_shape=(1, 10), num_classes=3, hidden=8).eval()
    x = torch.randn(2, 1, 10)
    out, _ = model.gru(to_sequence(x))
    torch.testing.assert_close(model(x), model.head(out[:, -1]))
    x2 = x.clone()
    x2[:, :, -1] += 1.0
    assert not torch.allclose(model(x), model(x2))


def test_transformer_structure_names():
    model = TransformerClassifier(input_shape=(1, 8, 8), num_classes=10, depth=3)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 3
    for block in model.blocks:
        assert isinstance(block.attn, SelfAttention)
        assert not block.attn.causal
        for name in ("q", "k", "v", "o"):
            assert isinstance(getattr(block.attn, name), nn.Linear)
        assert block.mlp.fc1.out_features == 4 * 64
        assert block.mlp.fc2.in_features == 4 * 64
        assert isinstance(block.mlp.act, nn.GELU)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# ----------------------------------------------------------------------------- attention


def _reference_attention(attn: SelfAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, t, d = x.shape
    hd = attn.head_dim
    h = d // hd

    def split(lin: nn.Linear) -> torch.Tensor:  # (B, T, D) -> (B, H, T, hd)
        y = x @ lin.weight.T + lin.bias
        return y.reshape(b, t, h, hd).permute(0, 2, 1, 3)

    q, k, v = split(attn.q), split(attn.k), split(attn.v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    y = scores.softmax(dim=-1) @ v  # (B, H, T, hd)
    y = y.permute(0, 2, 1, 3).reshape(b, t, d)
    return y @ attn.o.weight.T + attn.o.bias


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_hand_computed_reference(causal):
    attn = SelfAttention(dim=24, heads=3, attn_dropout=0.5, dropout=0.5, causal=causal).eval()
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, causal), atol=1e-5, rtol=0)


def test_attention_causality():
    t = 4
    x = torch.randn(2, 10, 16)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 10 - t - 1, 16)  # change only tokens after t

    causal = SelfAttention(dim=16, heads=4, causal=True).eval()
    y, y2 = causal(x), causal(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])

    # Control: without the mask the same change leaks into earlier positions.
    full = SelfAttention(dim=16, heads=4, causal=False).eval()
    assert not torch.allclose(full(x)[:, : t + 1], full(x2)[:, : t + 1])


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError):
        SelfAttention(dim=10, heads=4)


def test_attn_dropout_settable_at_run_time():
    model = TransformerClassifier(input_shape=(1, 8, 8), num_classes=5, dim=16, heads=2)
    x = torch.randn(4, 1, 8, 8)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(attns) == 2 and all(a.attn_dropout == 0.0 for a in attns)

    model.train()
    torch.testing.assert_close(model(x), model(x))  # no dropout anywhere: deterministic

    for a in attns:
        a.attn_dropout = 0.5
    assert not torch.allclose(model(x), model(x))  # now train-mode outputs are random

    model.eval()
    y_eval = model(x)
    torch.testing.assert_close(model(x), y_eval)
    for a in attns:
        a.attn_dropout = 0.0
    torch.testing.assert_close(model(x), y_eval)  # eval mode ignores attn_dropout


def test_attn_dropout_constructor_argument_reaches_blocks():
    model = TinyGPT(input_shape=(8,), num_classes=11, dim=16, depth=2, heads=2, attn_dropout=0.3)
    assert [b.attn.attn_dropout for b in model.blocks] == [0.3, 0.3]


# ----------------------------------------------------------------------------- TinyGPT


def _tiny_gpt(block_size: int = 16, vocab: int = 23) -> TinyGPT:
    return TinyGPT(input_shape=[block_size], num_classes=vocab, dim=32, depth=2, heads=4)


def test_gpt_shapes_loss_and_grads():
    model = _tiny_gpt()
    assert model.block_size == 16 and model.input_shape == (16,)
    idx = torch.randint(0, 23, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 23)
    assert logits._base is None
    loss = _loss(logits, torch.randint(0, 23, (3, 16)))
    # Untrained GPT-2-style init predicts nearly uniformly.
    assert abs(loss.item() - math.log(23)) < 0.2
    loss.backward()
    _assert_all_grads_finite_and_used(model)


def test_gpt_shorter_sequences_and_too_long():
    model = _tiny_gpt()
    assert model(torch.randint(0, 23, (2, 5))).shape == (2, 5, 23)
    with pytest.raises(ValueError):
        model(torch.randint(0, 23, (2, 17)))


def test_gpt_is_causal_end_to_end():
    model = _tiny_gpt().eval()
    t = 6
    idx = torch.randint(0, 23, (2, 16))
    idx2 = idx.clone()
    idx2[:, t + 1 :] = (idx2[:, t + 1 :] + 1) % 23
    y, y2 = model(idx), model(idx2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


def test_gpt_structure_and_untied_head():
    model = TinyGPT(input_shape=(128,), num_classes=256)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 4
    assert all(b.attn.causal for b in model.blocks)
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert model.head.bias is None
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_gpt_rejects_multidim_input_shape():
    with pytest.raises(ValueError):
        TinyGPT(input_shape=(1, 8), num_classes=10)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("cls", [MLP, CNN], ids=lambda c: c.__name__)
def test_overfits_fixed_batch(cls):
    model = cls(input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
