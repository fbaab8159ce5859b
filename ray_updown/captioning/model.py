"""The Up-Down captioning model (paper section 3.2, supplementary 6.2) in one readable file.

Two stacked LSTMs per word: the *attention* LSTM (top-down) decides where to look, additive
attention weighs the k bottom-up region features, and the *language* LSTM emits the word.

    x1_t  = [h2_{t-1}, v̄, W_e Π_t]                      eq. 2   (attention LSTM input)
    a_i,t = w_a^T tanh(W_va v_i + W_ha h1_t)            eq. 3
    α_t   = softmax(a_t)  (padded regions masked out)   eq. 4
    v̂_t   = Σ_i α_i,t v_i                               eq. 5
    x2_t  = [v̂_t, h1_t]                                 eq. 6   (language LSTM input)
    p(y_t | y_1:t-1) = softmax(W_p h2_t + b_p)          eq. 7

Images carry different numbers of regions, so features arrive padded to K with a boolean mask
(True = a real region). Padded regions are zeroed once in `encode` and get exactly zero attention,
so nothing a padded row contains can change any output. Token ids: PAD = 0 always; BOS and EOS
come from the caption vocabulary (ray_updown/data/coco.py) through the config.
Decoders (greedy, sampling, beam search, ensembles) live in ray_updown/captioning/decoding.py and use
only `init_state` and `step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_updown.config import check_at_least
from ray_updown.errors import ConfigError, DataError


@dataclass
class CaptionerConfig:
    """Sizes of the Up-Down captioner; defaults are the paper's (supplementary 6.2)."""

    vocab_size: int = 10010  # COCO Karpathy train words with count >= 5, plus special tokens
    feat_dim: int = 2048  # D of a bottom-up region feature
    spatial_dim: int = 0  # optional extra per-region spatial features concatenated after feat_dim
    embed_dim: int = 1000  # E: word embedding size (learned from scratch)
    hidden_dim: int = 512  # H: both LSTMs
    att_dim: int = 1000  # M: hidden units of the additive attention
    dropout: float = 0.5  # on h2_t before the output layer (eq. 7)
    max_len: int = 16  # most words per caption (EOS not counted), as Vocab.encode clips
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def validate(self) -> None:
        check_at_least(self, 1, "vocab_size", "feat_dim", "embed_dim", "hidden_dim", "att_dim",
                       "max_len")
        check_at_least(self, 0, "spatial_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", record="dropout")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{value} is outside the vocabulary of {self.vocab_size}",
                                  record=name)
        if len(set(ids.values())) != 3:
            raise ConfigError(f"pad, bos and eos ids must differ, got {ids}", record="pad_id")

    @property
    def input_dim(self) -> int:
        """Width of one region's input vector v_i (appearance + optional spatial features)."""
        return self.feat_dim + self.spatial_dim


@dataclass
class LSTMState:
    """Hidden and cell states of both LSTMs, each [N, H]."""

    h1: Tensor
    c1: Tensor
    h2: Tensor
    c2: Tensor

    def index_select(self, index: Tensor) -> "LSTMState":
        """Rows `index` of every tensor (beam search reorders hypotheses with this)."""
        return LSTMState(*(t.index_select(0, index) for t in (self.h1, self.c1, self.h2, self.c2)))

    def repeat_interleave(self, n: int) -> "LSTMState":
        return LSTMState(*(t.repeat_interleave(n, 0) for t in (self.h1, self.c1, self.h2, self.c2)))


@dataclass
class RegionContext:
    """Per-image quantities computed once and reused at every word."""

    feats: Tensor  # [N, K, D] v_i, padded rows zeroed
    proj_feats: Tensor  # [N, K, M] W_va v_i (eq. 3's image half)
    mask: Tensor  # [N, K] bool, True = real region
    mean_feat: Tensor  # [N, D] v̄, mean of the real regions (eq. 2)

    def repeat_interleave(self, n: int) -> "RegionContext":
        """Each image's context n times in a row (image-major), for beams or samples."""
        return RegionContext(self.feats.repeat_interleave(n, 0),
                             self.proj_feats.repeat_interleave(n, 0),
                             self.mask.repeat_interleave(n, 0),
                             self.mean_feat.repeat_interleave(n, 0))


class UpDownCaptioner(nn.Module):
    """Attention LSTM + additive region attention + language LSTM (eq. 2-7)."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        config.validate()  # sizes come from the data or a checkpoint, not through load_config
        self.config = config
        c = config
        D, E, H, M, V = c.input_dim, c.embed_dim, c.hidden_dim, c.att_dim, c.vocab_size
        self.word_embed = nn.Embedding(V, E, padding_idx=c.pad_id)  # W_e
        self.att_lstm = nn.LSTMCell(H + D + E, H)  # eq. 2
        self.feat_att_proj = nn.Linear(D, M)  # W_va (its bias stands in for a shared one)
        self.hidden_att_proj = nn.Linear(H, M, bias=False)  # W_ha
        self.att_score = nn.Linear(M, 1, bias=False)  # w_a (a bias would cancel in the softmax)
        self.lang_lstm = nn.LSTMCell(D + H, H)  # eq. 6
        self.output_dropout = nn.Dropout(c.dropout)
        self.output_proj = nn.Linear(H, V)  # W_p, b_p

    # -- per image ---------------------------------------------------------------------------
    def encode(self, feats: Tensor, mask: Tensor | None = None) -> RegionContext:
        """Zero padded regions, compute v̄ (eq. 2) and W_va v_i (eq. 3) once per image.

        feats [B, K, D] float, mask [B, K] bool (None = all regions real).
        """
        if feats.dim() != 3 or feats.shape[-1] != self.config.input_dim:
            raise DataError(f"region features must be [batch, regions, {self.config.input_dim}] "
                            f"(feat_dim + spatial_dim), got {list(feats.shape)}")
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if mask.shape != feats.shape[:2]:
            raise DataError(f"mask shape {list(mask.shape)} does not match features "
                            f"{list(feats.shape[:2])}")
        mask = mask.to(torch.bool)
        counts = mask.sum(1)
        if bool((counts == 0).any()):
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise DataError(f"image(s) at batch row(s) {rows} have no regions to attend to")
        # Dropping padded rows here (not only in the softmax) makes outputs independent of them.
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        mean_feat = feats.sum(1) / counts.unsqueeze(-1).to(feats.dtype)
        return RegionContext(feats, self.feat_att_proj(feats), mask, mean_feat)

    def init_state(self, feats: Tensor, mask: Tensor | None = None
                   ) -> tuple[LSTMState, RegionContext]:
        """Zero LSTM states (h2_{-1} = 0) and the image context, for `step`."""
        ctx = self.encode(feats, mask)
        zeros = ctx.mean_feat.new_zeros(ctx.mean_feat.shape[0], self.config.hidden_dim)
        return LSTMState(zeros, zeros, zeros, zeros), ctx

    # -- per word ----------------------------------------------------------------------------
    def attend(self, h1: Tensor, ctx: RegionContext) -> tuple[Tensor, Tensor]:
        """Additive attention over regions, eq. 3-5: returns v̂_t [N, D] and α_t [N, K].

        Padded regions get logit -inf, hence weight exactly 0.
        """
        scores = self.att_score(torch.tanh(ctx.proj_feats + self.hidden_att_proj(h1).unsqueeze(1)))
        scores = scores.squeeze(-1).masked_fill(~ctx.mask, float("-inf"))  # eq. 3
        alpha = torch.softmax(scores, dim=-1)  # eq. 4
        attended = torch.bmm(alpha.unsqueeze(1), ctx.feats).squeeze(1)  # eq. 5
        return attended, alpha

    def advance(self, word_embedding: Tensor, state: LSTMState, ctx: RegionContext
                ) -> tuple[LSTMState, Tensor]:
        """One time step of both LSTMs (eq. 2 and 6); returns the new state and α_t [N, K]."""
        x1 = torch.cat([state.h2, ctx.mean_feat, word_embedding], dim=-1)  # eq. 2
        h1, c1 = self.att_lstm(x1, (state.h1, state.c1))
        attended, alpha = self.attend(h1, ctx)
        x2 = torch.cat([attended, h1], dim=-1)  # eq. 6
        h2, c2 = self.lang_lstm(x2, (state.h2, state.c2))
        return LSTMState(h1, c1, h2, c2), alpha

    def output_logits(self, h2: Tensor) -> Tensor:
        """W_p h2_t + b_p (eq. 7 before its softmax), on [..., H]."""
        return self.output_proj(self.output_dropout(h2))

    def step(self, token: Tensor, state: LSTMState, ctx: RegionContext
             ) -> tuple[Tensor, LSTMState, Tensor]:
        """Feed the previous word Π_t (token [N] long): log p(y_t | y_1:t-1) [N, V] (eq. 7),
        the new state, and the attention weights α_t [N, K]."""
        state, alpha = self.advance(self.word_embed(token), state, ctx)
        return F.log_softmax(self.output_logits(state.h2), dim=-1), state, alpha

    def forward(self, feats: Tensor, mask: Tensor | None, captions: Tensor,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: captions [B, T] are the BOS-prefixed inputs; logits [B, T, V] at
        position t predict the word after captions[:, t] (for the XE loss, eq. 8-9).

        With return_attention=True also returns α [B, T, K].
        """
        if captions.dim() != 2 or captions.shape[0] != feats.shape[0]:
            raise DataError(f"captions must be [batch={feats.shape[0]}, time], "
                            f"got {list(captions.shape)}")
        if captions.numel() and (int(captions.min()) < 0
                                 or int(captions.max()) >= self.config.vocab_size):
            raise DataError(f"caption token ids must lie in [0, {self.config.vocab_size}), got "
                            f"[{int(captions.min())}, {int(captions.max())}]")
        state, ctx = self.init_state(feats, mask)
        embeddings = self.word_embed(captions)  # W_e Π_t for all t at once
        hiddens, alphas = [], []
        for t in range(captions.shape[1]):
            state, alpha = self.advance(embeddings[:, t], state, ctx)
            hiddens.append(state.h2)
            alphas.append(alpha)
        if hiddens:
            logits = self.output_logits(torch.stack(hiddens, 1))  # one matmul for all steps
            attention = torch.stack(alphas, 1)
        else:
            logits = feats.new_zeros(feats.shape[0], 0, self.config.vocab_size)
            attention = feats.new_zeros(feats.shape[0], 0, feats.shape[1])
        return (logits, attention) if return_attention else logits
