"""Decoding captions from one Up-Down captioner or an ensemble of them.

Greedy search, sampling with a temperature (for SCST, eq. 10-11) and batched beam search
(beam 5 in the paper). Every function takes one model or a list of models; a list is decoded
as an ensemble whose next-word log-probabilities are the mean of its members' (the paper's
4-model server submission). Everything runs batched on the device of the features.

Sequences are [N, L] token tensors without BOS: at most max_len words, then EOS, then PAD (as
Vocab.encode writes targets). L is the number of steps actually run (<= max_len + 1); after
max_len words only EOS may follow, so every caption ends with EOS. The score of a sequence is
the sum of its tokens' log-probabilities (eq. 8 in log form); no length normalisation.

Decoding rules (paper 3.2 and the original decoder): PAD and BOS are never produced; with
`no_consecutive_repeat` a word is never predicted twice in a row; with `repeatable_ids` set
(the strict rule of the original decoder) no word may appear twice except those ids — pass
`function_word_ids(word_to_id)` for the original list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ray_updown.captioning.model import UpDownCaptioner
from ray_updown.errors import ConfigError

# Words the original Up-Down decoder let repeat inside one caption.
FUNCTION_WORDS: tuple[str, ...] = ("a", "the", "of", ",", "on", "in", "and", "with", "is", "an",
                                   '"', "to", "some", "at", "are", "it", "that", "'", "by")

Models = UpDownCaptioner | Sequence[UpDownCaptioner]


def function_word_ids(word_to_id: Mapping[str, int]) -> tuple[int, ...]:
    """Ids of FUNCTION_WORDS present in a vocabulary (words it lacks are skipped)."""
    return tuple(sorted(word_to_id[w] for w in FUNCTION_WORDS if w in word_to_id))


@dataclass
class DecodingRules:
    """Constraints on generated captions."""

    max_len: int = 16  # words per caption; EOS follows at the latest after max_len words
    no_consecutive_repeat: bool = True  # the paper's rule
    repeatable_ids: tuple[int, ...] | None = None  # set => strict rule: only these may repeat
    banned_ids: tuple[int, ...] = ()  # never produced (e.g. UNK); PAD and BOS always are


@dataclass
class DecodeResult:
    """One sequence per row (greedy or sampling)."""

    tokens: Tensor  # [N, L] long
    token_log_probs: Tensor  # [N, L], 0 at PAD positions
    lengths: Tensor  # [N] tokens including EOS
    attention: Tensor | None = None  # [N, L, K] α_t per generated token

    @property
    def scores(self) -> Tensor:
        """[N] log-probability of each sequence."""
        return self.token_log_probs.sum(-1)


@dataclass
class BeamSearchResult:
    """All beams of every image, best first."""

    tokens: Tensor  # [B, W, L] long
    scores: Tensor  # [B, W] sum of token log-probs, descending; -inf for unused beams
    token_log_probs: Tensor  # [B, W, L]
    lengths: Tensor  # [B, W]
    attention: Tensor | None = None  # [B, L, K] α_t of the best beam

    def best(self) -> DecodeResult:
        """The top beam of each image."""
        return DecodeResult(self.tokens[:, 0], self.token_log_probs[:, 0], self.lengths[:, 0],
                            self.attention)


def strip_special(tokens: Tensor, eos_id: int, pad_id: int = 0) -> list[list[int]]:
    """Token rows (any leading shape, last dim = time) to lists of word ids without EOS/PAD."""
    rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
    out = []
    for row in rows:
        words = []
        for tok in row:
            if tok in (eos_id, pad_id):
                break
            words.append(tok)
        out.append(words)
    return out


def _default_rules(models: Models, no_consecutive_repeat: bool = True) -> DecodingRules:
    """The paper's rules with the model's configured max_len."""
    first = models if isinstance(models, UpDownCaptioner) else next(iter(models), None)
    max_len = first.config.max_len if first is not None else DecodingRules.max_len
    return DecodingRules(max_len=max_len, no_consecutive_repeat=no_consecutive_repeat)


class _Stepper:
    """Runs one model or an ensemble step by step; averages log-probs (and attention)."""

    def __init__(self, models: Models, feats: Tensor, mask: Tensor | None):
        self.models = [models] if isinstance(models, UpDownCaptioner) else list(models)
        if not self.models:
            raise ConfigError("decoding needs at least one model")
        first = self.models[0].config
        for m in self.models[1:]:
            c = m.config
            if (c.vocab_size, c.pad_id, c.bos_id, c.eos_id) != (
                    first.vocab_size, first.pad_id, first.bos_id, first.eos_id):
                raise ConfigError("ensemble members must share vocabulary size and special ids")
        self.config = first
        pairs = [m.init_state(feats, mask) for m in self.models]
        self.states = [s for s, _ in pairs]
        self.ctxs = [c for _, c in pairs]

    def repeat_interleave(self, n: int) -> None:
        self.states = [s.repeat_interleave(n) for s in self.states]
        self.ctxs = [c.repeat_interleave(n) for c in self.ctxs]

    def reorder(self, index: Tensor) -> None:
        # Contexts need no reordering: beams only move within their own image.
        self.states = [s.index_select(index) for s in self.states]

    def step(self, token: Tensor) -> tuple[Tensor, Tensor]:
        log_probs, alphas = [], []
        for i, model in enumerate(self.models):
            lp, self.states[i], alpha = model.step(token, self.states[i], self.ctxs[i])
            log_probs.append(lp)
            alphas.append(alpha)
        if len(log_probs) == 1:
            return log_probs[0], alphas[0]
        return torch.stack(log_probs).mean(0), torch.stack(alphas).mean(0)


class _RuleMasks:
    """Turns DecodingRules into boolean masks over the vocabulary."""

    def __init__(self, rules: DecodingRules, config, device: torch.device):
        V = config.vocab_size
        if rules.max_len <= 0:
            raise ConfigError(f"must be positive, got {rules.max_len}", record="max_len")
        ids = list(rules.banned_ids) + list(rules.repeatable_ids or ())
        if any(not 0 <= i < V for i in ids):
            raise ConfigError(f"decoding rule ids must lie in [0, {V}), got {sorted(ids)}")
        if config.eos_id in rules.banned_ids:
            raise ConfigError("EOS cannot be banned: captions must be able to end",
                              record="banned_ids")
        self.rules = rules
        self.eos_id = config.eos_id
        self.never = torch.zeros(V, dtype=torch.bool, device=device)
        self.never[[config.pad_id, config.bos_id, *rules.banned_ids]] = True
        self.strict = rules.repeatable_ids is not None
        if self.strict:
            self.no_repeat = torch.ones(V, dtype=torch.bool, device=device)
            self.no_repeat[[config.eos_id, *rules.repeatable_ids]] = False

    def new_used(self, n: int) -> Tensor | None:
        """[n, V] bool: which words each hypothesis has produced (strict rule only)."""
        return torch.zeros(n, self.never.numel(), dtype=torch.bool,
                           device=self.never.device) if self.strict else None

    def apply(self, log_probs: Tensor, last: Tensor, used: Tensor | None, t: int) -> Tensor:
        """log_probs [N, V] at step t with forbidden next words set to -inf (last [N]: the
        previous word)."""
        if t >= self.rules.max_len:  # max_len words produced: the caption must end
            only_eos = torch.full_like(log_probs, float("-inf"))
            only_eos[:, self.eos_id] = log_probs[:, self.eos_id]
            return only_eos
        banned = self.never.expand_as(log_probs).clone()
        if self.rules.no_consecutive_repeat:
            banned.scatter_(1, last.unsqueeze(1), True)
        if used is not None:
            banned |= used & self.no_repeat
        return log_probs.masked_fill(banned, float("-inf"))

    def mark_used(self, used: Tensor | None, token: Tensor) -> Tensor | None:
        if used is None:
            return None
        used = used.clone()
        used[torch.arange(token.shape[0], device=token.device), token] = True
        return used


def _generate(models: Models, feats: Tensor, mask: Tensor | None, rules: DecodingRules,
              temperature: float | None, num_samples: int, generator: torch.Generator | None,
              return_attention: bool) -> DecodeResult:
    """Left-to-right decoding of one sequence per row: argmax (temperature None) or sampling."""
    stepper = _Stepper(models, feats, mask)
    cfg = stepper.config
    masks = _RuleMasks(rules, cfg, feats.device)
    if num_samples > 1:
        stepper.repeat_interleave(num_samples)
    n = feats.shape[0] * num_samples
    last = torch.full((n,), cfg.bos_id, dtype=torch.long, device=feats.device)
    finished = torch.zeros(n, dtype=torch.bool, device=feats.device)
    used = masks.new_used(n)
    tokens, token_log_probs, alphas = [], [], []
    for t in range(rules.max_len + 1):
        log_probs, alpha = stepper.step(last)
        allowed = masks.apply(log_probs, last, used, t)
        if temperature is None:
            chosen = allowed.argmax(-1)
            chosen_lp = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        else:
            # The policy actually sampled from: tempered, restricted to allowed words.
            policy = torch.log_softmax(allowed / temperature, dim=-1)
            chosen = torch.multinomial(policy.detach().exp(), 1, generator=generator).squeeze(1)
            chosen_lp = policy.gather(1, chosen.unsqueeze(1)).squeeze(1)
        token = chosen.masked_fill(finished, cfg.pad_id)
        tokens.append(token)
        token_log_probs.append(chosen_lp.masked_fill(finished, 0.0))
        if return_attention:
            alphas.append(alpha)
        used = masks.mark_used(used, token)
        finished = finished | (token == cfg.eos_id)
        last = token
        if bool(finished.all()):
            break
    tokens_t = torch.stack(tokens, 1)
    return DecodeResult(tokens_t, torch.stack(token_log_probs, 1),
                        (tokens_t != cfg.pad_id).sum(1),
                        torch.stack(alphas, 1) if return_attention else None)


@torch.no_grad()
def greedy_decode(models: Models, feats: Tensor, mask: Tensor | None = None,
                  rules: DecodingRules | None = None, return_attention: bool = False
                  ) -> DecodeResult:
    """The most likely next word at every step (rules default: the paper's, with the model's
    config.max_len). Rows = images.

    token_log_probs are the model's (ensemble's) log-probabilities of the chosen words.
    """
    return _generate(models, feats, mask, rules or _default_rules(models), None, 1, None,
                     return_attention)


def sample_decode(models: Models, feats: Tensor, mask: Tensor | None = None,
                  rules: DecodingRules | None = None, temperature: float = 1.0,
                  num_samples: int = 1, generator: torch.Generator | None = None,
                  return_attention: bool = False) -> DecodeResult:
    """Sample captions (SCST's sampled form). Keeps the autograd graph.

    Rows are image-major: row b * num_samples + j is sample j of image b. token_log_probs are
    log-probabilities under the distribution sampled from (softmax(log p / temperature) over
    the words the rules allow), so REINFORCE gradients are exact. Rules default to no repeat
    constraint (only PAD/BOS excluded). Pass a seeded `generator` for reproducible samples.
    """
    if temperature <= 0:
        raise ConfigError(f"must be positive, got {temperature}", record="temperature")
    if num_samples <= 0:
        raise ConfigError(f"must be positive, got {num_samples}", record="num_samples")
    return _generate(models, feats, mask,
                     rules or _default_rules(models, no_consecutive_repeat=False), temperature,
                     num_samples, generator, return_attention)


@torch.no_grad()
def beam_search(models: Models, feats: Tensor, mask: Tensor | None = None, beam_size: int = 5,
                rules: DecodingRules | None = None, return_attention: bool = False
                ) -> BeamSearchResult:
    """Batched beam search over B images (rules default: the paper's, with
    the model's config.max_len).

    Keeps the beam_size best partial captions per image by summed log-probability. A finished
    caption (EOS) stays in the beam with its score frozen and competes with unfinished ones; so
    the returned beams are the best complete captions found, and with a beam as wide as the
    number of possible hypotheses the search is exhaustive.
    """
    if beam_size <= 0:
        raise ConfigError(f"must be positive, got {beam_size}", record="beam_size")
    rules = rules or _default_rules(models)
    stepper = _Stepper(models, feats, mask)
    cfg = stepper.config
    masks = _RuleMasks(rules, cfg, feats.device)
    B, W, V, device = feats.shape[0], beam_size, cfg.vocab_size, feats.device
    N = B * W
    stepper.repeat_interleave(W)
    # Only the first beam is live at the start; the others would duplicate it.
    scores = torch.full((B, W), float("-inf"), device=device)
    scores[:, 0] = 0.0
    last = torch.full((N,), cfg.bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    used = masks.new_used(N)
    tokens = torch.zeros(N, 0, dtype=torch.long, device=device)
    token_log_probs = feats.new_zeros(N, 0)
    attention = feats.new_zeros(N, 0, feats.shape[1]) if return_attention else None
    # A finished hypothesis can only continue with PAD at no cost.
    pad_only = torch.full((V,), float("-inf"), device=device)
    pad_only[cfg.pad_id] = 0.0
    image_offset = (torch.arange(B, device=device) * W).unsqueeze(1)
    for t in range(rules.max_len + 1):
        log_probs, alpha = stepper.step(last)
        allowed = masks.apply(log_probs, last, used, t)
        allowed = torch.where(finished.unsqueeze(1), pad_only.to(allowed.dtype), allowed)
        candidates = (scores.reshape(N, 1) + allowed).reshape(B, W * V)
        scores, flat_index = candidates.topk(W, dim=1)  # sorted, best first
        origin = (image_offset + flat_index // V).reshape(N)
        token = (flat_index % V).reshape(N)
        step_lp = allowed[origin, token]
        step_lp = step_lp.masked_fill(torch.isinf(step_lp), 0.0)  # dead beams: keep finite
        tokens = torch.cat([tokens[origin], token.unsqueeze(1)], 1)
        token_log_probs = torch.cat([token_log_probs[origin], step_lp.unsqueeze(1)], 1)
        if attention is not None:
            attention = torch.cat([attention[origin], alpha[origin].unsqueeze(1)], 1)
        used = masks.mark_used(used[origin] if used is not None else None, token)
        # Beams with score -inf (fewer live candidates than beams) count as finished.
        finished = finished[origin] | (token == cfg.eos_id) | torch.isinf(scores.reshape(N))
        last = token
        stepper.reorder(origin)
        if bool(finished.all()):
            break
    L = tokens.shape[1]
    tokens = tokens.reshape(B, W, L)
    best_attention = attention.reshape(B, W, L, -1)[:, 0] if attention is not None else None
    return BeamSearchResult(tokens, scores, token_log_probs.reshape(B, W, L),
                            (tokens != cfg.pad_id).sum(-1), best_attention)


def sequence_log_probs(model: UpDownCaptioner, feats: Tensor, mask: Tensor | None,
                       tokens: Tensor) -> Tensor:
    """Per-token log p(y_t | y_1:t-1) [N, L] of given sequences by teacher forcing (eq. 8).

    tokens [N, L] as the decoders return them (no BOS; PAD after EOS); positions after EOS get
    0. Keeps the autograd graph: SCST over decoded beams re-scores them with this.
    """
    cfg = model.config
    bos = torch.full((tokens.shape[0], 1), cfg.bos_id, dtype=torch.long, device=tokens.device)
    inputs = torch.cat([bos, tokens[:, :-1]], 1)
    logits = model(feats, mask, inputs)
    log_probs = torch.log_softmax(logits, -1).gather(2, tokens.unsqueeze(2)).squeeze(2)
    return log_probs.masked_fill(tokens == cfg.pad_id, 0.0)
