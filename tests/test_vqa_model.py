"""The Up-Down VQA model at tiny sizes: shapes, masking, eq. 12-14, GloVe init, training, ensembles."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from ray_updown.errors import ConfigError, DataError
from ray_updown.vqa.model import GatedTanh, ReluLayer, VqaConfig, VqaModel, ensemble_scores, soft_accuracy, vqa_loss

TINY = dict(num_tokens=12, num_answers=5, embed_dim=8, hidden=16, feat_dim=6, question_len=5)
CONFIGS = {
    "paper": VqaConfig.paper(**TINY),
    "reimplementation": VqaConfig.reimplementation(**{**TINY, "hidden": 16}),
    "projection": VqaConfig.projection(**TINY),
}


def make_batch(batch_size=4, num_regions=7, seed=0, config=CONFIGS["paper"]):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, config.num_tokens, (batch_size, config.question_len), generator=g)
    tokens[0, 3:] = config.pad_index          # back-padded question
    tokens[1, :2] = config.pad_index          # front-padded question
    feats = torch.randn(batch_size, num_regions, config.region_dim, generator=g)
    mask = torch.ones(batch_size, num_regions, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return tokens, feats, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_and_attention_sums_to_one(name):
    model = VqaModel(CONFIGS[name], seed=0)
    tokens, feats, mask = make_batch()
    logits, attention = model(tokens, feats, mask, return_attention=True)
    assert logits.shape == (4, 5) and attention.shape == (4, 7)
    assert torch.allclose(attention.sum(1), torch.ones(4))
    scores = model.predict(tokens, feats, mask)
    assert scores.shape == (4, 5) and ((scores > 0) & (scores < 1)).all()


def test_variant_layout_matches_reimplementation():
    relu = VqaModel(CONFIGS["reimplementation"], seed=0)
    paper = VqaModel(CONFIGS["paper"], seed=0)
    # Weight norm over the whole matrix: a scalar gain per layer.
    assert relu.classifier.parametrizations.weight.original0.numel() == 1
    assert relu.output_layer.linear.out_features == 2 * 16
    assert isinstance(paper.attention_layer, GatedTanh)
    assert not hasattr(paper.classifier, "parametrizations")


def test_padded_regions_get_zero_attention_and_do_not_change_output():
    model = VqaModel(CONFIGS["paper"], seed=1)
    tokens, feats, mask = make_batch()
    logits, attention = model(tokens, feats, mask, return_attention=True)
    assert (attention[~mask] == 0).all()
    assert (attention[mask] > 0).all()
    assert attention[2, 0] == 1.0  # the only real region takes all the weight
    changed = feats.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), feats.shape[2]) * 100
    changed[0, 5] = float("nan")
    assert torch.equal(model(tokens, changed, mask), logits)
    # Without the mask, the padded regions would matter: the test can fail.
    assert not torch.allclose(model(tokens, changed.nan_to_num(), None), logits)


def test_no_real_region_attends_to_nothing_without_nan():
    model = VqaModel(CONFIGS["paper"], seed=1)
    tokens, feats, mask = make_batch()
    mask[3] = False
    logits, attention = model(tokens, feats, mask, return_attention=True)
    assert torch.isfinite(logits).all() and (attention[3] == 0).all()


def test_question_padding_side_does_not_matter():
    model = VqaModel(CONFIGS["paper"], seed=2)
    _, feats, mask = make_batch()
    front = torch.tensor([[0, 0, 3, 7, 5]]).repeat(4, 1)
    back = torch.tensor([[3, 7, 5, 0, 0]]).repeat(4, 1)
    assert torch.allclose(model(front, feats, mask), model(back, feats, mask), atol=1e-6)
    other = torch.tensor([[5, 7, 3, 0, 0]]).repeat(4, 1)
    assert not torch.allclose(model(other, feats, mask), model(back, feats, mask))


def test_question_state_without_packing_equals_the_packed_one():
    """The GPU's path (the padded batch, each state taken at its last real token, no host
    copy of the lengths) gives the packed path's q, an empty question included."""
    model = VqaModel(CONFIGS["paper"], seed=3)
    unpacked = VqaModel(dataclasses.replace(CONFIGS["paper"], packed_questions=False), seed=3)
    tokens, feats, mask = make_batch(batch_size=5)
    tokens[3] = CONFIGS["paper"].pad_index  # no real token: both read one pad token
    packed, padded = model.encode_question(tokens), unpacked.encode_question(tokens)
    assert torch.allclose(packed, padded, atol=1e-6)
    assert torch.allclose(model(tokens, feats, mask), unpacked(tokens, feats, mask), atol=1e-5)
    # The state after the last real token differs from the state after the pads that follow it.
    assert not torch.allclose(model.question_gru(model.word_embedding(tokens))[1][-1][0], padded[0])


def test_gated_tanh_on_hand_set_weights():
    layer = GatedTanh(2, 2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
        layer.linear.bias.copy_(torch.tensor([0.1, -0.2]))
        layer.gate.weight.copy_(torch.tensor([[0.3, -1.0], [2.0, 1.0]]))
        layer.gate.bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([[0.5, -1.0]])
    y = layer(x)
    # By hand: Wx+b = [0.5-2+0.1, -0.5-0.5-0.2] = [-1.4, -1.2]; W'x+b' = [0.15+1, 1-1+0.5]
    expected = torch.tanh(torch.tensor([-1.4, -1.2])) * torch.sigmoid(torch.tensor([1.15, 0.5]))
    assert torch.allclose(y[0], expected, atol=1e-6)


@pytest.mark.parametrize("layer_class, weight_norm", [(GatedTanh, False), (ReluLayer, True)])
def test_a_layer_over_region_question_pairs_equals_it_over_their_concatenation(layer_class,
                                                                                weight_norm):
    # f_a([v_i, q]) of eq. 15 without building [B, K, D + H]: the same values and gradients.
    torch.manual_seed(0)
    layer = layer_class(6 + 4, 3, weight_norm)
    regions, question = torch.randn(2, 5, 6), torch.randn(2, 4)
    pairs = torch.cat([regions, question.unsqueeze(1).expand(-1, 5, -1)], dim=2)
    concatenated = layer(pairs)
    concatenated.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    split = layer.forward_pairs(regions, question)
    split.sum().backward()
    assert torch.allclose(split, concatenated, atol=1e-6)
    for before, p in zip(grads, layer.parameters()):
        assert torch.allclose(p.grad, before, atol=1e-6)


def test_glove_init_copies_matrix_and_rejects_wrong_dim():
    model = VqaModel(CONFIGS["paper"], seed=0)
    matrix = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    model.load_embeddings(matrix)
    assert np.array_equal(model.word_embedding.weight.detach().numpy(), matrix)
    with pytest.raises(DataError, match=r"glove\.50d\.txt.*\(12, 50\).*\(12, 8\)"):
        model.load_embeddings(np.zeros((12, 50)), source="glove.50d.txt")
    with pytest.raises(DataError):
        model.load_embeddings(np.zeros((11, 8)))


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="empty"):
        VqaConfig(**{**TINY, "num_answers": 0}).validate()
    with pytest.raises(ConfigError, match="nonlinearity"):
        VqaConfig(**{**TINY, "nonlinearity": "swish"}).validate()
    with pytest.raises(ConfigError, match="nonlinearity"):
        VqaModel(VqaConfig(**{**TINY, "nonlinearity": "swish"}))
    with pytest.raises(ConfigError, match="hidden"):
        VqaConfig.from_dict({**TINY, "hidden": 0})
    with pytest.raises(ConfigError, match="unknown"):
        VqaConfig.from_dict({**TINY, "hiden": 3})
    assert VqaConfig.from_dict(CONFIGS["reimplementation"].to_dict()) == CONFIGS["reimplementation"]


def test_wrong_feature_dim_is_data_error():
    model = VqaModel(CONFIGS["paper"], seed=0)
    tokens, feats, mask = make_batch()
    with pytest.raises(DataError, match="feat_dim"):
        model(tokens, feats[:, :, :5], mask)


def test_loss_matches_reimplementation_scaling():
    logits = torch.tensor([[0.2, -1.0, 3.0], [0.0, 0.5, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.9]])
    p = torch.sigmoid(logits)
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum() / 2
    assert torch.allclose(vqa_loss(logits, targets), by_hand, atol=1e-6)
    assert soft_accuracy(logits, targets).tolist() == pytest.approx([0.3, 0.6])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trains_on_toy_problem(name):
    """The answer is the class of the region holding a marker; loss must fall."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    n, k = 64, 4
    feats = torch.randn(n, k, config.region_dim) * 0.1
    answer = torch.randint(0, config.num_answers, (n,))
    marked = torch.randint(0, k, (n,))
    feats[torch.arange(n), marked, answer] += 3.0
    tokens = torch.randint(1, config.num_tokens, (n, config.question_len))
    targets = torch.zeros(n, config.num_answers)
    targets[torch.arange(n), answer] = 1.0
    mask = torch.ones(n, k, dtype=torch.bool)
    model = VqaModel(config, seed=0)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = vqa_loss(model(tokens, feats, mask), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    accuracy = soft_accuracy(model.predict(tokens, feats, mask), targets).mean()
    assert accuracy > 0.8


def test_ensemble_of_identical_models_equals_single_and_averages():
    model = VqaModel(CONFIGS["reimplementation"], seed=3)
    tokens, feats, mask = make_batch(config=CONFIGS["reimplementation"])
    batch = {"question_tokens": tokens, "feats": feats, "mask": mask}
    single = model.predict(tokens, feats, mask)
    assert torch.allclose(ensemble_scores([model, copy.deepcopy(model), model], batch), single)
    other = VqaModel(CONFIGS["reimplementation"], seed=4)
    mean = (single + other.predict(tokens, feats, mask)) / 2
    assert torch.allclose(ensemble_scores([model, other], batch), mean)
    assert model.training  # predict restored the mode
    with pytest.raises(ConfigError):
        ensemble_scores([], batch)


def test_seed_makes_initialisation_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = VqaModel(CONFIGS["paper"], seed=7)
    assert torch.equal(torch.rand(1), before)  # fork_rng: the global stream is untouched
    b = VqaModel(CONFIGS["paper"], seed=7)
    c = VqaModel(CONFIGS["paper"], seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    tokens, feats, mask = make_batch()
    assert torch.equal(a(tokens, feats, mask), b(tokens, feats, mask))


def test_projection_attention_on_hand_set_weights():
    """a_i = w_a^T (ReLU(W_v v_i) * ReLU(W_q q)): with identities and w_a = (1, 2), regions
    (1, 0), (0, 1), (-1, 3) under q = (2, 1) score 2, 2 and 6."""
    config = VqaConfig(num_tokens=3, num_answers=2, embed_dim=2, hidden=2, feat_dim=2,
                       question_len=2, nonlinearity="relu", attention="projection")
    model = VqaModel(config, seed=0).eval()
    with torch.no_grad():
        for layer in (model.attention_region.linear, model.attention_question.linear):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        model.attention_weight.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.attention_weight.bias.zero_()
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 3.0]]])
    alpha = model.attend(torch.tensor([[2.0, 1.0]]), feats, torch.ones(1, 3, dtype=torch.bool))
    total = 2 * math.exp(2) + math.exp(6)
    expected = torch.tensor([[math.exp(2) / total, math.exp(2) / total, math.exp(6) / total]])
    assert torch.allclose(alpha, expected, atol=1e-6)


def test_projection_preset_has_the_peer_default_models_size_and_dropouts():
    """bottom-up-attention-vqa's baseline0_newatt at 19,901 words (+ padding), 3,129 answers,
    2,048-d regions: 24,851,177 parameters; its baseline0 (our reimplementation) 1,025 fewer."""
    sizes = dict(num_tokens=19_902, num_answers=3129, feat_dim=2048)
    count = {name: sum(p.numel() for p in VqaModel(build(**sizes)).parameters())
             for name, build in (("projection", VqaConfig.projection),
                                 ("reimplementation", VqaConfig.reimplementation))}
    assert count == {"projection": 24_851_177, "reimplementation": 24_850_152}
    model = VqaModel(VqaConfig.projection(**TINY))
    assert model.attention_dropout.p == 0.2 and model.embedding_dropout.p == 0.0
    assert model.classifier_dropout.p == 0.5


def test_each_preset_trains_with_the_optimizer_it_was_trained_with():
    from ray_updown.vqa.config import VqaModelOptions, VqaTrainConfig
    from ray_updown.vqa.train import build_optimizer

    chosen = {preset: type(build_optimizer(VqaTrainConfig(model=VqaModelOptions(preset=preset)),
                                           [torch.nn.Parameter(torch.zeros(1))])).__name__
              for preset in ("paper", "reimplementation", "projection")}
    assert chosen == {"paper": "Adadelta", "reimplementation": "Adamax", "projection": "Adamax"}
    named = VqaTrainConfig(model=VqaModelOptions(preset="projection"), optimizer="adadelta")
    assert named.optimizer_name() == "adadelta"


@pytest.mark.parametrize("name", ["paper", "projection"])
def test_bf16_training_follows_the_fp32_loss_curve(name):
    """Ten epochs of a toy problem in bf16 autocast: each epoch's mean loss within 10% of
    fp32's, and both fall (bf16 keeps float32's range: no loss scaling)."""
    from ray_updown.vqa.config import VqaModelOptions, VqaTrainConfig
    from ray_updown.vqa.train import build_optimizer, train_step

    g = torch.Generator().manual_seed(0)
    config = CONFIGS[name]
    tokens = torch.randint(1, config.num_tokens, (96, config.question_len), generator=g)
    feats = torch.randn(96, 7, config.region_dim, generator=g).relu()
    targets = torch.zeros(96, config.num_answers)
    targets[torch.arange(96), feats[:, 0, :config.num_answers].argmax(1)] = 1.0
    curves = {}
    for precision in ("fp32", "bf16"):
        model = VqaModel(config, seed=0)
        optimizer = build_optimizer(VqaTrainConfig(model=VqaModelOptions(preset=name),
                                                   lr=None if name == "paper" else 0.01),
                                    model.parameters())
        curves[precision] = [np.mean([
            train_step(model, optimizer, {"question_tokens": tokens[i:i + 32],
                                          "feats": feats[i:i + 32], "targets": targets[i:i + 32],
                                          "mask": torch.ones(32, 7, dtype=torch.bool)},
                       0.25, precision) for i in range(0, 96, 32)]) for _ in range(10)]
    assert curves["fp32"][-1] < 0.9 * curves["fp32"][0]
    assert np.allclose(curves["bf16"], curves["fp32"], rtol=0.10), curves
