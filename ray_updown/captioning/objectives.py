"""The captioner's two training objectives and its CIDEr-D reward (paper 3.2).

Cross-entropy (eq. 9) by teacher forcing, and self-critical sequence training (SCST, eq.
10-11) in two forms:

- "beam" (the paper's): the candidates are the k captions of the decoded beam (beam 5) and the
  baseline is the mean reward of those k captions, so each gets r(w^i) - mean_j r(w^j);
- "sample" (the common form): k captions sampled from the model, with the greedy caption's
  reward as baseline ("greedy", Rennie et al.) or the mean reward of the other k - 1 samples
  ("mean_of_others").

In both forms the candidates are decoded without gradients, then re-scored by one
teacher-forced pass of the (possibly DistributedDataParallel) model, so that DDP synchronises
the gradients; the loss is -sum_i (r(w^i) - b_i) log p(w^i), averaged over candidates. SCST
runs the model without dropout (`model.eval()`): the re-scored log-probabilities are then
exactly those of the policy the candidates came from. Rewards are CIDEr-D with document
frequencies from the training references (`CiderReward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_updown.captioning.data import CaptionBatch
from ray_updown.captioning.decoding import beam_search, greedy_decode, sample_decode, strip_special
from ray_updown.config import validate_fields
from ray_updown.data.coco import Vocab
from ray_updown.errors import ConfigError
from ray_updown.metrics.cider import CiderD
from ray_updown.train.worker import unwrap


@dataclass
class SCSTConfig:
    """Self-critical training (eq. 10-11); starts from a cross-entropy checkpoint."""

    form: Literal["beam", "sample"] = "beam"  # beam: the paper's decoded beam; sample: k samples
    num_candidates: int = 5  # beam size (beam form) or samples per image (sample form)
    baseline: Literal["greedy", "mean_of_others"] = "greedy"  # sample form only
    temperature: float = 1.0  # sample form only
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 5e-5
    init_from: str = ""  # cross-entropy checkpoint directory/URI (required for a new SCST run)

    def validate(self) -> None:
        validate_fields(self)  # form, baseline, optimizer
        if self.num_candidates < 2:
            raise ConfigError(f"needs at least 2 candidates per image, got "
                              f"{self.num_candidates}", record="num_candidates")
        for name in ("temperature", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", record=name)


def xe_loss(model: nn.Module, batch: CaptionBatch, pad_id: int = 0) -> tuple[Tensor, dict]:
    """Eq. 9: L_XE = -sum_t log p(y*_t | y*_1:t-1) over each caption's words and its EOS,
    averaged over the batch's captions. Returns (loss, stats with summed counts)."""
    feats = batch.feats[batch.caption_image]
    mask = batch.mask[batch.caption_image]
    logits = model(feats, mask, batch.inputs).float()  # the loss in float32, under bf16 too
    nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=pad_id,
                          reduction="none")  # [N, T], 0 at padding
    per_caption = nll.sum(1)
    stats = {"loss_sum": float(per_caption.detach().sum()), "captions": batch.num_captions,
             "tokens": int((batch.targets != pad_id).sum())}
    return per_caption.mean(), stats


class CiderReward:
    """CIDEr-D of token sequences against reference captions, with document frequencies
    from a fixed corpus (the training references: the SCST reward r of eq. 10-11).

    Scored on token ids (`CiderD.score_ids`): candidates go from the decoder's tensor to
    n-grams without becoming strings, and each reference caption is turned into ids once.
    Reference words outside the captioning vocabulary get ids of their own beyond it, so an
    <unk> of a candidate matches none of them and every score equals the string path's.
    """

    def __init__(self, training_references: Sequence[Sequence[str]], vocab: Vocab):
        self.vocab = vocab
        words = list(vocab.itos)
        self._word_ids = dict(vocab.stoi)
        for refs in training_references:  # words beyond the vocabulary, in a fixed order
            for caption in refs:
                for word in caption.split():
                    if word not in self._word_ids:
                        self._word_ids[word] = len(words)
                        words.append(word)
        self.scorer = CiderD(training_references, vocabulary=words)
        self._reference_ids: dict[str, list[int]] = {}

    def captions(self, tokens: Tensor) -> list[str]:
        """Token rows (no BOS; EOS then PAD) -> space-joined words."""
        rows = strip_special(tokens.detach().cpu(), self.vocab.eos_id, self.vocab.pad_id)
        return [" ".join(self.vocab.itos[i] for i in row) for row in rows]

    def _ids(self, caption: str) -> list[int]:
        ids = self._reference_ids.get(caption)
        if ids is None:
            ids = [self._word_id(word) for word in caption.split()]
            self._reference_ids[caption] = ids
        return ids

    def _word_id(self, word: str) -> int:
        if word not in self._word_ids:  # a word of no training reference (validation)
            self._word_ids[word] = len(self._word_ids)
        return self._word_ids[word]

    def __call__(self, tokens: Tensor, references: Sequence[Sequence[str]]) -> np.ndarray:
        """[N] CIDEr-D of each row of tokens [N, L] against references[n]."""
        candidates = strip_special(tokens.detach().cpu(), self.vocab.eos_id, self.vocab.pad_id)
        return self.scorer.score_ids(candidates, [[self._ids(r) for r in refs]
                                                  for refs in references])[1]

    def score_strings(self, tokens: Tensor, references: Sequence[Sequence[str]]) -> np.ndarray:
        """The same scores through the string path (what the ids path is checked against)."""
        return self.scorer.score(self.captions(tokens), references)[1]


def policy_log_probs(model: nn.Module, feats: Tensor, mask: Tensor, tokens: Tensor,
                     temperature: float = 1.0) -> Tensor:
    """[N] log p(w) of decoded sequences (no BOS; EOS then PAD) by one teacher-forced pass.

    PAD and BOS, which decoding never produces, are excluded from the softmax, and the EOS
    forced after max_len words carries no choice (log-prob 0): the result is the log-
    probability under the distribution the sampler drew from.
    """
    cfg = unwrap(model).config
    bos = torch.full((tokens.shape[0], 1), cfg.bos_id, dtype=torch.long, device=tokens.device)
    logits = model(feats, mask, torch.cat([bos, tokens[:, :-1]], 1)).float()
    never = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    never[[cfg.pad_id, cfg.bos_id]] = True
    logits = logits.masked_fill(never, float("-inf")) / temperature
    token_lp = torch.log_softmax(logits, -1).gather(2, tokens.unsqueeze(2)).squeeze(2)
    token_lp = token_lp.masked_fill(tokens == cfg.pad_id, 0.0)
    if token_lp.shape[1] > cfg.max_len:
        token_lp = torch.cat([token_lp[:, :cfg.max_len],
                              token_lp.new_zeros(token_lp.shape[0],
                                                 token_lp.shape[1] - cfg.max_len)], 1)
    return token_lp.sum(1)


def scst_loss(model: nn.Module, batch: CaptionBatch, reward: CiderReward, cfg: SCSTConfig,
              generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Eq. 10-11: the self-critical policy gradient loss of one batch (see the module doc).

    `model` may be wrapped in DistributedDataParallel; it should be in eval mode.
    """
    core = unwrap(model)
    B, k = len(batch.image_ids), cfg.num_candidates
    with torch.no_grad():
        if cfg.form == "beam":
            beams = beam_search(core, batch.feats, batch.mask, beam_size=k)
            tokens = beams.tokens.reshape(B * k, -1)
            # beams that found no caption (tiny vocabularies) are no candidates
            valid = torch.isfinite(beams.scores).cpu().numpy().reshape(B, k)
        else:
            tokens = sample_decode(core, batch.feats, batch.mask, temperature=cfg.temperature,
                                   num_samples=k, generator=generator).tokens
            valid = np.ones((B, k), dtype=bool)
    references = [batch.references[n // k] for n in range(B * k)]
    rewards = reward(tokens, references).reshape(B, k)
    n_valid = np.maximum(valid.sum(1, keepdims=True), 1)
    if cfg.form == "beam":  # eq. 11: the beam's mean reward
        baseline = np.broadcast_to((rewards * valid).sum(1, keepdims=True) / n_valid, (B, k))
    elif cfg.baseline == "greedy":  # eq. 10: the greedy caption's reward
        greedy = greedy_decode(core, batch.feats, batch.mask).tokens
        baseline = np.broadcast_to(reward(greedy, batch.references)[:, None], (B, k))
    else:  # the mean reward of the other samples of the same image
        baseline = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
    advantage = torch.as_tensor((rewards - baseline) * valid, dtype=batch.feats.dtype,
                                device=batch.feats.device).reshape(B * k)
    temperature = cfg.temperature if cfg.form == "sample" else 1.0
    log_p = policy_log_probs(model, batch.feats.repeat_interleave(k, 0),
                             batch.mask.repeat_interleave(k, 0), tokens, temperature)
    loss = -(advantage * log_p).sum() / float(valid.sum())
    stats = {"loss_sum": float(loss.detach()) * float(valid.sum()), "captions": int(valid.sum()),
             "reward_sum": float((rewards * valid).sum()),
             "baseline_sum": float((np.asarray(baseline) * valid).sum())}
    return loss, stats


@torch.no_grad()
def greedy_cider(model: nn.Module, batches: Iterable[CaptionBatch], reward: CiderReward,
                 device: torch.device) -> tuple[float, int]:
    """(sum of CIDEr-D, images) of greedy captions over batches: the per-epoch val metric."""
    core = unwrap(model)
    was_training = core.training
    core.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        tokens = greedy_decode(core, batch.feats, batch.mask).tokens
        total += float(reward(tokens, batch.references).sum())
        count += len(batch.image_ids)
    core.train(was_training)
    return total, count
