"""The Up-Down VQA model (paper 3.3, supp. 6.3; Teney et al. 2018).

One model, two configurations of it:

* the paper's: gated tanh layers (eq. 12-14), hidden 512, no weight norm;
* the public re-implementation's variant (hengyuan-hu/bottom-up-attention-vqa): ReLU layers,
  weight norm over each whole weight matrix (a single scalar gain per layer), hidden 1024,
  classifier width 2 x hidden with dropout 0.5 before the output layer. (Its optimiser, Adamax,
  and gradient clipping belong to the training loop, not to the model.)

Attention comes in two forms (`attention`): the paper's "concat" (eq. 15, f_a over [v_i, q])
and "projection", the re-implementation's default model (its `baseline0_newatt`): the region
and the question are each projected to the hidden size by their own layer, multiplied
elementwise, and scored by w_a. Preset `projection` is that whole model.

Shapes: B questions, T = question_len tokens, K regions of D = feat_dim + spatial_dim, A answers.
Question tokens may be padded with `pad_index` on either side (the re-implementation pads in
front); the GRU reads only the real tokens, so the side does not matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from ray_updown.config import check_at_least, from_dict, validate_fields
from ray_updown.errors import ConfigError, DataError


@dataclass
class VqaConfig:
    """Hyperparameters of the Up-Down VQA model; defaults are the paper's configuration."""

    num_tokens: int = 1                # question vocabulary size, including the padding token
    num_answers: int = 1               # candidate answers (3,129 on VQA v2)
    embed_dim: int = 300               # GloVe word vectors
    hidden: int = 512                  # GRU state and every joint layer (paper: 512)
    feat_dim: int = 2048               # region feature size from the detector
    spatial_dim: int = 0               # extra per-region features appended to feats (e.g. boxes)
    question_len: int = 14             # tokens per question after trimming/padding
    pad_index: int = 0                 # token id of padding (its embedding row gets no gradient)
    nonlinearity: Literal["gated_tanh", "relu"] = "gated_tanh"  # paper: eq. 12-14; variant: relu
    weight_norm: bool = False          # weight norm on every linear layer (variant: True)
    classifier_hidden: int = 0         # width of f_o; 0 means 2 x hidden (the variant's layout)
    dropout: float = 0.0               # on word embeddings and on f_a's output before w_a
    classifier_dropout: float = 0.0    # between f_o and W_o (variant: 0.5)
    l2_normalize_features: bool = False  # Teney et al. L2-normalise each region feature
    attention: Literal["concat", "projection"] = "concat"  # paper: eq. 15; see the module doc
    attention_dropout: float | None = None  # before w_a; None: the same as `dropout`
    # How the GRU reads the questions (the same q either way; `encode_question`): packed
    # sequences, or the padded batch with no host copy of the lengths. False is for GPUs and
    # stays off until measured on one (benchmarks/gpu_check.py, vqa_steps)
    packed_questions: bool = True

    def validate(self) -> None:
        validate_fields(self)  # nonlinearity, attention
        if self.num_answers < 1:
            raise ConfigError("the answer vocabulary is empty (num_answers must be >= 1)",
                              record="num_answers")
        check_at_least(self, 1, "num_tokens", "embed_dim", "hidden", "feat_dim", "question_len")
        check_at_least(self, 0, "spatial_dim", "classifier_hidden")
        if not 0 <= self.pad_index < self.num_tokens:
            raise ConfigError(f"pad_index {self.pad_index} outside [0, {self.num_tokens})",
                              record="pad_index")
        for name in ("dropout", "classifier_dropout", "attention_dropout"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)}", record=name)

    @property
    def region_dim(self) -> int:
        """Size of one region vector the model reads: feature plus spatial extras."""
        return self.feat_dim + self.spatial_dim

    @property
    def output_hidden(self) -> int:
        """Width of f_o (eq. 17)."""
        return self.classifier_hidden or 2 * self.hidden

    @classmethod
    def paper(cls, **overrides) -> "VqaConfig":
        """The paper's configuration: gated tanh, hidden 512, no weight norm."""
        return cls(**overrides)

    @classmethod
    def reimplementation(cls, **overrides) -> "VqaConfig":
        """The public re-implementation's variant: ReLU + weight norm, hidden 1024, dropout 0.5."""
        values = dict(nonlinearity="relu", weight_norm=True, hidden=1024, classifier_dropout=0.5)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def projection(cls, **overrides) -> "VqaConfig":
        """The re-implementation's default model (`baseline0_newatt`): its variant with the
        projection attention and dropout 0.2 before w_a, none on the word embeddings."""
        values = dict(nonlinearity="relu", weight_norm=True, hidden=1024, classifier_dropout=0.5,
                      attention="projection", attention_dropout=0.2)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "VqaConfig":
        """Build from a checkpoint's config.json section (config.from_dict: unknown keys are a
        ConfigError, the result is validated)."""
        return from_dict(cls, dict(values), None)


def _linear(in_dim: int, out_dim: int, use_weight_norm: bool) -> nn.Linear:
    """A linear layer, weight-normalised over the whole matrix (dim=None) when asked."""
    layer = nn.Linear(in_dim, out_dim)
    return _weight_norm(layer, dim=None) if use_weight_norm else layer


def linear_of_pairs(layer: nn.Linear, regions: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """`layer([v_i, q])` for every region i [B, K, out], without building the concatenation:
    W [v; q] + b = W_v v + (W_q q + b), the question's half once per question instead of once
    per region (the same numbers up to float rounding, at a fraction of the cost)."""
    weight = layer.weight  # under weight norm, the normalised matrix
    split = regions.shape[-1]
    question_half = F.linear(question, weight[:, split:], layer.bias)
    return F.linear(regions, weight[:, :split]) + question_half.unsqueeze(1)


class GatedTanh(nn.Module):
    """Gated tanh layer f(x) = tanh(W x + b) ∘ σ(W' x + b') (eq. 12-14)."""

    def __init__(self, in_dim: int, out_dim: int, use_weight_norm: bool = False):
        super().__init__()
        self.linear = _linear(in_dim, out_dim, use_weight_norm)  # W, b   (eq. 12)
        self.gate = _linear(in_dim, out_dim, use_weight_norm)    # W', b' (eq. 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * torch.sigmoid(self.gate(x))  # eq. 14

    def forward_pairs(self, regions: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """f([v_i, q]) for every region (see `linear_of_pairs`). [B, K, out]"""
        return (torch.tanh(linear_of_pairs(self.linear, regions, question))
                * torch.sigmoid(linear_of_pairs(self.gate, regions, question)))


class ReluLayer(nn.Module):
    """The variant's replacement for eq. 12-14: f(x) = ReLU(W x + b)."""

    def __init__(self, in_dim: int, out_dim: int, use_weight_norm: bool = False):
        super().__init__()
        self.linear = _linear(in_dim, out_dim, use_weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(x))

    def forward_pairs(self, regions: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """f([v_i, q]) for every region (see `linear_of_pairs`). [B, K, out]"""
        return F.relu(linear_of_pairs(self.linear, regions, question))


def nonlinear_layer(config: VqaConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The non-linear layer f(.) the config selects: gated tanh (paper) or ReLU (variant)."""
    layer_class = GatedTanh if config.nonlinearity == "gated_tanh" else ReluLayer
    return layer_class(in_dim, out_dim, config.weight_norm)


def last_states(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """outputs[b, lengths[b] - 1] of a batch-first RNN's outputs [B, T, H]: each sequence's
    state after its last real step, gathered on the outputs' device. [B, H]"""
    at = (lengths - 1).to(outputs.device).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
    return outputs.gather(1, at).squeeze(1)


class VqaModel(nn.Module):
    """Up-Down VQA: GRU question encoding, top-down attention over regions, joint classifier.

    `forward` returns logits W_o f_o(h); the scores of eq. 17 are their sigmoid (`predict`).
    Build with `seed=` for a deterministic initialisation that leaves the global RNG alone.
    """

    def __init__(self, config: VqaConfig, seed: int | None = None):
        super().__init__()
        config.validate()  # sizes come from the data or a checkpoint, not through load_config
        self.config = config
        if seed is None:
            self._build(config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(config)

    def _build(self, c: VqaConfig) -> None:
        self.word_embedding = nn.Embedding(c.num_tokens, c.embed_dim, padding_idx=c.pad_index)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.question_gru = nn.GRU(c.embed_dim, c.hidden, batch_first=True)
        if c.attention == "concat":
            self.attention_layer = nonlinear_layer(c, c.region_dim + c.hidden, c.hidden)  # f_a
        else:
            self.attention_region = nonlinear_layer(c, c.region_dim, c.hidden)
            self.attention_question = nonlinear_layer(c, c.hidden, c.hidden)
        self.attention_dropout = nn.Dropout(c.dropout if c.attention_dropout is None
                                            else c.attention_dropout)
        self.attention_weight = _linear(c.hidden, 1, c.weight_norm)                   # w_a
        self.question_layer = nonlinear_layer(c, c.hidden, c.hidden)                  # f_q
        self.image_layer = nonlinear_layer(c, c.region_dim, c.hidden)                 # f_v
        self.output_layer = nonlinear_layer(c, c.hidden, c.output_hidden)             # f_o
        self.classifier_dropout = nn.Dropout(c.classifier_dropout)
        self.classifier = _linear(c.output_hidden, c.num_answers, c.weight_norm)      # W_o

    @property
    def device(self) -> torch.device:
        return self.word_embedding.weight.device

    def load_embeddings(self, matrix: np.ndarray | torch.Tensor, source: str | None = None) -> None:
        """Copy a [num_tokens, embed_dim] word-vector matrix (e.g. built from GloVe) in place.

        A matrix of another shape (a GloVe file of the wrong dimension, a vocabulary mismatch)
        is a DataError naming `source`.
        """
        weights = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
        expected = (self.config.num_tokens, self.config.embed_dim)
        if tuple(weights.shape) != expected:
            raise DataError(f"word-vector matrix has shape {tuple(weights.shape)}, the model "
                            f"expects {expected} (num_tokens, embed_dim)", file=source)
        with torch.no_grad():
            self.word_embedding.weight.copy_(weights)

    def encode_question(self, question_tokens: torch.Tensor,
                        packed: bool | None = None) -> torch.Tensor:
        """q = the GRU's final hidden state after the question's real (non-pad) tokens. [B, H]

        `packed` (None: the config's `packed_questions`) runs the GRU on packed sequences,
        skipping the pad steps; pack_padded_sequence needs the lengths on the host, so on a GPU
        every step waits there for its queue of kernels. Otherwise the GRU reads the whole
        padded batch and each question's state is taken at its last real token: the same q,
        with all T steps computed and no copy to the host.
        """
        is_word = question_tokens != self.config.pad_index
        # Stable sort moves real tokens to the front in order, so front- and back-padding agree.
        order = torch.argsort((~is_word).to(torch.int8), dim=1, stable=True)
        tokens = torch.gather(question_tokens, 1, order)
        lengths = is_word.sum(1).clamp(min=1)  # an empty question reads one pad token
        words = self.embedding_dropout(self.word_embedding(tokens))
        if self.config.packed_questions if packed is None else packed:
            sequences = nn.utils.rnn.pack_padded_sequence(words, lengths.cpu(), batch_first=True,
                                                          enforce_sorted=False)
            return self.question_gru(sequences)[1][-1]
        return last_states(self.question_gru(words)[0], lengths)

    def attend(self, question: torch.Tensor, feats: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """a_i = w_a^T f_a([v_i, q]), α = softmax over real regions (eq. 15). [B, K]

        With `attention="projection"`: a_i = w_a^T (f_v'(v_i) ∘ f_q'(q)), each of f_v', f_q'
        its own layer to the hidden size. Padded regions get exactly zero weight; a question
        with no real region attends to nothing (all zeros) instead of producing NaN.
        """
        if self.config.attention == "concat":
            joint = self.attention_layer.forward_pairs(feats, question)  # f_a([v_i, q])
        else:
            joint = self.attention_region(feats) * self.attention_question(question).unsqueeze(1)
        logits = self.attention_weight(self.attention_dropout(joint))
        logits = logits.squeeze(2).masked_fill(~mask, torch.finfo(logits.dtype).min)
        return torch.softmax(logits, dim=1) * mask

    def forward(self, question_tokens: torch.Tensor, feats: torch.Tensor,
                mask: torch.Tensor | None = None, return_attention: bool = False):
        """Logits [B, A] (and attention α [B, K] when `return_attention`).

        question_tokens [B, T] long; feats [B, K, D] float; mask [B, K] bool, True = real region
        (None: all real).
        """
        if feats.dim() != 3 or feats.shape[2] != self.config.region_dim:
            raise DataError(f"region features have shape {tuple(feats.shape)}, the model expects "
                            f"[B, K, {self.config.region_dim}] (feat_dim + spatial_dim)")
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        mask = mask.to(torch.bool)
        # Zero padded rows so that whatever they hold (even NaN) cannot reach the output.
        feats = feats.float().masked_fill(~mask.unsqueeze(2), 0.0)
        if self.config.l2_normalize_features:
            feats = F.normalize(feats, dim=2)
        question = self.encode_question(question_tokens)                    # q
        attention = self.attend(question, feats, mask)                      # α, eq. 15
        attended = torch.bmm(attention.unsqueeze(1), feats).squeeze(1)      # v̂ = Σ α_i v_i
        joint = self.question_layer(question) * self.image_layer(attended)  # h, eq. 16
        logits = self.classifier(self.classifier_dropout(self.output_layer(joint)))  # eq. 17
        return (logits, attention) if return_attention else logits

    @torch.no_grad()
    def predict(self, question_tokens: torch.Tensor, feats: torch.Tensor,
                mask: torch.Tensor | None = None, return_attention: bool = False):
        """Answer scores s = σ(W_o f_o(h)) (eq. 17) [B, A], in eval mode (mode restored after)."""
        was_training = self.training
        self.eval()
        try:
            device = self.device
            out = self(question_tokens.to(device), feats.to(device),
                       None if mask is None else mask.to(device), return_attention)
        finally:
            self.train(was_training)
        if return_attention:
            return torch.sigmoid(out[0]), out[1]
        return torch.sigmoid(out)


def vqa_loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(logits) against soft scores (paper 3.3, Teney et al.).

    Summed over the A answers and averaged over the batch: the re-implementation's scaling
    (its per-element mean times A), which keeps gradients independent of the answer count.
    """
    if logits.shape != soft_targets.shape:
        raise DataError(f"logits {tuple(logits.shape)} and soft targets "
                        f"{tuple(soft_targets.shape)} differ in shape")
    loss = F.binary_cross_entropy_with_logits(logits, soft_targets.to(logits.dtype),
                                              reduction="none")
    return loss.sum(1).mean()


def soft_accuracy(scores: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Per question: the soft score of the top-scoring answer (the VQA accuracy of it). [B]"""
    best = scores.argmax(1, keepdim=True)
    return soft_targets.gather(1, best.to(soft_targets.device)).squeeze(1)


def ensemble_scores(models: Sequence[VqaModel], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the members' sigmoid scores [B, A] (the paper's 30-model ensemble).

    `batch` holds "question_tokens", "feats" and optionally "mask"; the result is on the
    first member's device.
    """
    if not models:
        raise ConfigError("an ensemble needs at least one member", record="ensemble")
    missing = [k for k in ("question_tokens", "feats") if k not in batch]
    if missing:
        raise DataError(f"batch lacks {missing}", record="ensemble")
    device = models[0].device
    total = None
    for model in models:
        scores = model.predict(batch["question_tokens"], batch["feats"], batch.get("mask"))
        total = scores.to(device) if total is None else total + scores.to(device)
    return total / len(models)
