"""The Up-Down captioner (eq. 2-7) and its decoders, at tiny sizes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from ray_updown.captioning.decoding import (
    DecodingRules,
    beam_search,
    function_word_ids,
    greedy_decode,
    sample_decode,
    sequence_log_probs,
    strip_special,
)
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.errors import ConfigError, DataError

PAD, BOS, EOS = 0, 1, 2


def tiny_model(vocab_size: int = 8, seed: int = 0, spatial_dim: int = 0) -> UpDownCaptioner:
    torch.manual_seed(seed)
    cfg = CaptionerConfig(vocab_size=vocab_size, feat_dim=6, spatial_dim=spatial_dim, embed_dim=5,
                          hidden_dim=7, att_dim=4, dropout=0.0, max_len=5)
    model = UpDownCaptioner(cfg).eval()
    # Sharpen the output layer so that distributions differ clearly between steps.
    with torch.no_grad():
        model.output_proj.weight.mul_(4.0)
    return model


def tiny_batch(batch: int = 3, regions: int = 4, dim: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, regions, dim, generator=g)
    mask = torch.ones(batch, regions, dtype=torch.bool)
    mask[1:, 2:] = False  # later images have 2 and 3 regions
    mask[2:, 2] = True
    return feats, mask


def test_forward_shapes_and_attention_sums_to_one():
    model = tiny_model(spatial_dim=2)
    feats, mask = tiny_batch(dim=8)
    captions = torch.tensor([[BOS, 3, 4, 5], [BOS, 6, PAD, PAD], [BOS, 7, 3, PAD]])
    logits, attention = model(feats, mask, captions, return_attention=True)
    assert logits.shape == (3, 4, 8)
    assert attention.shape == (3, 4, 4)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4))
    assert model(feats, mask, captions).shape == (3, 4, 8)
    state, ctx = model.init_state(feats, mask)
    log_probs, state, alpha = model.step(torch.full((3,), BOS), state, ctx)
    assert log_probs.shape == (3, 8) and alpha.shape == (3, 4) and state.h2.shape == (3, 7)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))


def test_padded_regions_get_exactly_zero_attention_and_change_nothing():
    model = tiny_model()
    feats, mask = tiny_batch()
    captions = torch.tensor([[BOS, 3, 4], [BOS, 5, 6], [BOS, 7, 3]])
    logits, attention = model(feats, mask, captions, return_attention=True)
    assert torch.all(attention[~mask.unsqueeze(1).expand_as(attention)] == 0.0)
    assert torch.all(attention[mask.unsqueeze(1).expand_as(attention)] > 0.0)
    changed = feats.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 1e3
    logits2, attention2 = model(changed, mask, captions, return_attention=True)
    assert torch.equal(logits, logits2) and torch.equal(attention, attention2)
    # v̄ is the mean over real regions only: dropping the padding entirely gives the same output.
    alone = model(feats[1:2, :2], mask[1:2, :2], captions[1:2])
    torch.testing.assert_close(alone, logits[1:2])


def test_step_matches_teacher_forcing():
    model = tiny_model()
    feats, mask = tiny_batch()
    captions = torch.tensor([[BOS, 3, 4], [BOS, 5, 6], [BOS, 7, 3]])
    logits, attention = model(feats, mask, captions, return_attention=True)
    state, ctx = model.init_state(feats, mask)
    for t in range(3):
        log_probs, state, alpha = model.step(captions[:, t], state, ctx)
        torch.testing.assert_close(log_probs, torch.log_softmax(logits[:, t], -1))
        torch.testing.assert_close(alpha, attention[:, t])


def test_gradient_flows_in_teacher_forcing():
    model = tiny_model()
    model.train()
    feats, mask = tiny_batch()
    captions = torch.tensor([[BOS, 3, 4], [BOS, 5, 6], [BOS, 7, 3]])
    targets = torch.tensor([[3, 4, EOS], [5, 6, EOS], [7, 3, EOS]])
    logits = model(feats, mask, captions)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 8), targets.reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    feats, mask = tiny_batch()
    with pytest.raises(DataError, match="no regions"):
        model(feats, torch.zeros_like(mask), torch.tensor([[BOS]] * 3))
    with pytest.raises(DataError, match="regions, 6"):
        model(feats[..., :5], mask, torch.tensor([[BOS]] * 3))
    with pytest.raises(DataError, match="token ids"):
        model(feats, mask, torch.tensor([[BOS, 99]] * 3))
    with pytest.raises(ConfigError):
        CaptionerConfig(vocab_size=2).validate()
    with pytest.raises(ConfigError):
        UpDownCaptioner(CaptionerConfig(vocab_size=2))
    with pytest.raises(ConfigError):
        beam_search(model, feats, mask, rules=DecodingRules(banned_ids=(EOS,)))


# -- exhaustive reference ---------------------------------------------------------------------
def allowed_sequences(vocab_size, max_len, rules):
    """Every caption the rules allow: up to max_len words, then EOS."""
    words = [w for w in range(vocab_size) if w not in (PAD, BOS, EOS, *rules.banned_ids)]
    out = []
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            if rules.no_consecutive_repeat and any(a == b for a, b in zip(seq, seq[1:])):
                continue
            if rules.repeatable_ids is not None and any(
                    seq.count(w) > 1 for w in set(seq) if w not in rules.repeatable_ids):
                continue
            out.append(seq + (EOS,))
    return out


def exhaustive_ranking(models, feats, mask, rules):
    """(score, sequence) for every allowed caption of each image, best first, scored by
    teacher forcing (an independent path from step()) with log-probs averaged over models."""
    seqs = allowed_sequences(models[0].config.vocab_size, rules.max_len, rules)
    rankings = []
    for b in range(feats.shape[0]):
        scored = []
        for seq in seqs:
            tokens = torch.tensor([list(seq)])
            with torch.no_grad():
                lp = torch.stack([sequence_log_probs(m, feats[b:b + 1], mask[b:b + 1], tokens)
                                  for m in models]).mean(0)
            scored.append((float(lp.sum()), seq))
        rankings.append(sorted(scored, key=lambda x: -x[0]))
    return rankings


def beams_as_tuples(result, b):
    out = []
    for w in range(result.tokens.shape[1]):
        if torch.isinf(result.scores[b, w]):
            continue
        row = result.tokens[b, w].tolist()
        out.append((float(result.scores[b, w]), tuple(t for t in row if t != PAD)))
    return out


@pytest.mark.parametrize("rules", [
    DecodingRules(max_len=3),
    DecodingRules(max_len=3, no_consecutive_repeat=False),
    DecodingRules(max_len=4, repeatable_ids=(3,)),
])
def test_wide_beam_equals_exhaustive_search(rules):
    model = tiny_model(vocab_size=6)
    feats, mask = tiny_batch(batch=2)
    ranking = exhaustive_ranking([model], feats, mask, rules)
    width = max(len(r) for r in ranking) + 3  # as wide as every hypothesis, plus dead beams
    with torch.no_grad():
        result = beam_search(model, feats, mask, beam_size=width, rules=rules)
    for b in range(2):
        found = beams_as_tuples(result, b)
        assert [s for _, s in found] == [s for _, s in ranking[b]]
        torch.testing.assert_close(torch.tensor([x for x, _ in found]),
                                   torch.tensor([x for x, _ in ranking[b]]))
    # Narrow beams still return valid captions, best first, no better than the optimum.
    narrow = beam_search(model, feats, mask, beam_size=2, rules=rules)
    assert torch.all(narrow.scores[:, 0] <= result.scores[:, 0] + 1e-5)
    assert torch.all(narrow.scores[:, 0] >= narrow.scores[:, 1])


def test_beam_token_log_probs_match_teacher_forcing_and_attention():
    model = tiny_model()
    feats, mask = tiny_batch()
    result = beam_search(model, feats, mask, beam_size=3, return_attention=True)
    B, W, L = result.tokens.shape
    flat = result.tokens.reshape(B * W, L)
    rescored = sequence_log_probs(model, feats.repeat_interleave(W, 0),
                                  mask.repeat_interleave(W, 0), flat)
    torch.testing.assert_close(rescored.reshape(B, W, L), result.token_log_probs)
    torch.testing.assert_close(result.token_log_probs.sum(-1), result.scores)
    assert result.attention.shape == (B, L, 4)
    # The best beam's attention is the model's attention when teacher-forced on that beam.
    best = result.best()
    inputs = torch.cat([torch.full((B, 1), BOS), best.tokens[:, :-1]], 1)
    _, att = model(feats, mask, inputs, return_attention=True)
    for b in range(B):
        n = int(best.lengths[b])
        torch.testing.assert_close(result.attention[b, :n], att[b, :n])


def biased_model():
    """A model that prefers word 4 overwhelmingly, then word 3, and rarely ends."""
    model = tiny_model(vocab_size=8)
    with torch.no_grad():
        model.output_proj.weight.zero_()
        model.output_proj.bias.copy_(torch.tensor([0., 0., -5., 3., 10., 2., 1., 0.]))
    return model


def test_no_repeat_rules():
    model = biased_model()
    feats, mask = tiny_batch()
    free = greedy_decode(model, feats, mask, DecodingRules(max_len=5, no_consecutive_repeat=False))
    assert free.tokens[0].tolist() == [4, 4, 4, 4, 4, EOS]
    assert free.lengths[0] == 6  # max_len words, then the forced EOS
    assert greedy_decode(model, feats, mask).tokens.shape[1] == model.config.max_len + 1
    paper = greedy_decode(model, feats, mask, DecodingRules(max_len=5))
    assert paper.tokens[0].tolist() == [4, 3, 4, 3, 4, EOS]
    strict = DecodingRules(max_len=5, repeatable_ids=(3,))
    assert greedy_decode(model, feats, mask, strict).tokens[0].tolist() == [4, 3, 5, 3, 6, EOS]
    # The beam finds the better caption greedy misses (biases 3+10+3+2+3 > 10+3+2+3+1).
    assert beam_search(model, feats, mask, 3, strict).tokens[0, 0].tolist() == [3, 4, 3, 5, 3, EOS]
    for row in beam_search(model, feats, mask, 4, strict).tokens.reshape(-1, 6).tolist():
        words = [t for t in row if t not in (PAD, EOS)]
        assert all(a != b for a, b in zip(words, words[1:]))
        assert all(words.count(w) == 1 for w in words if w != 3)
    banned = greedy_decode(model, feats, mask, DecodingRules(max_len=3, banned_ids=(4,)))
    assert 4 not in banned.tokens.tolist()


def test_function_word_ids():
    vocab = {"<pad>": 0, "a": 5, "dog": 6, "the": 7, ",": 9}
    assert function_word_ids(vocab) == (5, 7, 9)


def test_greedy_equals_beam_of_one():
    model = tiny_model()
    feats, mask = tiny_batch()
    for rules in (DecodingRules(), DecodingRules(repeatable_ids=(3, 4))):
        greedy = greedy_decode(model, feats, mask, rules, return_attention=True)
        beam = beam_search(model, feats, mask, beam_size=1, rules=rules, return_attention=True)
        assert torch.equal(greedy.tokens, beam.tokens[:, 0])
        torch.testing.assert_close(greedy.scores, beam.scores[:, 0])
        torch.testing.assert_close(greedy.attention, beam.attention)
        assert torch.equal(greedy.lengths, beam.lengths[:, 0])


def test_ensembles():
    model = tiny_model()
    other = tiny_model(seed=5)
    feats, mask = tiny_batch()
    single = beam_search(model, feats, mask, beam_size=3)
    for models in ([model], [model, copy.deepcopy(model)]):
        ens = beam_search(models, feats, mask, beam_size=3)
        assert torch.equal(ens.tokens, single.tokens)
        torch.testing.assert_close(ens.scores, single.scores)
    # Two different models: the ensemble ranks by the mean of their log-probs, exactly.
    rules = DecodingRules(max_len=2)
    small, small_other = tiny_model(vocab_size=6), tiny_model(vocab_size=6, seed=5)
    ranking = exhaustive_ranking([small, small_other], feats, mask, rules)
    ens = beam_search([small, small_other], feats, mask, beam_size=12, rules=rules)
    for b in range(3):
        assert [s for _, s in beams_as_tuples(ens, b)] == [s for _, s in ranking[b]]
    mixed = greedy_decode([model, other], feats, mask)
    assert mixed.tokens.shape[0] == 3
    with pytest.raises(ConfigError):
        greedy_decode([model, tiny_model(vocab_size=9)], feats, mask)


def test_sampling_is_reproducible_and_differentiable():
    model = tiny_model()
    model.train()
    feats, mask = tiny_batch()
    runs = [sample_decode(model, feats, mask, num_samples=5,
                          generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].tokens.shape[0] == 15
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert len({tuple(r) for r in runs[0].tokens.tolist()}) > 1  # samples differ
    # Temperature 1, no repeat rule: the returned log-probs are the model's, renormalised
    # over the words that can be produced (all but PAD and BOS).
    model.eval()
    result = sample_decode(model, feats, mask, num_samples=2,
                           generator=torch.Generator().manual_seed(3))
    inputs = torch.cat([torch.full((6, 1), BOS), result.tokens[:, :-1]], 1)
    logits = model(feats.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), inputs)
    logits[..., [PAD, BOS]] = float("-inf")
    expected = torch.log_softmax(logits, -1).gather(2, result.tokens.unsqueeze(2)).squeeze(2)
    expected = expected.masked_fill(result.tokens == PAD, 0.0)
    if expected.shape[1] > model.config.max_len:  # EOS forced after max_len words: probability 1
        expected[:, model.config.max_len] = 0.0
    torch.testing.assert_close(expected, result.token_log_probs)
    (-result.scores.sum()).backward()
    assert model.output_proj.weight.grad.abs().sum() > 0
    assert model.feat_att_proj.weight.grad.abs().sum() > 0
    # A low temperature approaches greedy decoding.
    cold = sample_decode(model, feats, mask, rules=DecodingRules(), temperature=1e-3,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold.tokens, greedy_decode(model, feats, mask).tokens)


def test_strip_special():
    tokens = torch.tensor([[3, 4, EOS, PAD], [5, 5, 6, 7], [EOS, PAD, PAD, PAD]])
    assert strip_special(tokens, EOS) == [[3, 4], [5, 5, 6, 7], []]
