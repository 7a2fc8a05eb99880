"""The frozen backbone reading and writing item codes: its vocabulary plus one token per code.

A recommender over codes needs, for each code token, an input embedding (to read a history of
codes) and a row of the output head (to generate them). Both belong to the recommender's plug-in,
never to the shared backbone: `coded_backbone` returns a `Backbone` whose model *shares* every
layer, the final norm and the text embeddings with the original (no copy, still frozen) and only
adds `CodeEmbedding` / `CodeHead` modules around them. Everything built on `Backbone` — the
stepper, token trees, the draft (its first layers), cached features — then works on codes as it
does on text.

The code rows are fixed and carry the codes' meaning: a code points where its residual
centroid points in the titles' LSA space (mapped into the hidden size by a fixed random
orthonormal matrix), so codes of similar items have similar rows — reading a history of codes
and scoring the next one start from the titles' similarity. (Purely random rows were tried
first: on 300 validation users their target reached Recall@10 0.0002.) As inputs the rows have
the scale of the text embeddings; as outputs, a hidden state aligned with a row gives it a logit
of `MAX_LOGIT`. Fixed classifiers train as well as learned ones (Hoffer et al., 2018), and fixed
inputs keep the backbone's taps over a code history a constant function of the history, so they
are computed once and cached — the side network, trained on those taps, is what learns. Learning
the rows would mean back-propagating through the 30-layer backbone for every example and epoch,
hours on two CPU cores. The head gives −∞ to every text token: a coded backbone only ever
generates codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personalization.atspeed.codes import ItemCodes
from personalization.backbone.frozen import Backbone


class CodeEmbedding(nn.Module):
    """The backbone's token embedding for ids < vocab, the code rows above it."""

    def __init__(self, text: nn.Embedding, codes: Tensor):
        super().__init__()
        self.text = text
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.vocab = text.num_embeddings
        self.num_embeddings = self.vocab + codes.shape[0]
        self.embedding_dim = codes.shape[1]

    @property
    def weight(self) -> Tensor:  # what transformers reads for the dtype and device
        return self.codes

    def forward(self, ids: Tensor) -> Tensor:
        is_code = ids >= self.vocab
        out = self.text(ids.clamp(max=self.vocab - 1))
        if bool(is_code.any()):
            codes = F.embedding((ids - self.vocab).clamp(min=0), self.codes).to(out.dtype)
            out = torch.where(is_code[..., None], codes, out)
        return out


class CodeHead(nn.Module):
    """Logits over text + codes: −∞ for text tokens, the code rows' dot products for codes.

    `weight` is indexed by token id like any LM head (rows below `vocab` are never read: the
    draft's head asks only for the rows a catalogue allows, all of them codes)."""

    def __init__(self, vocab: int, codes: Tensor):
        super().__init__()
        self.vocab = vocab
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.in_features = codes.shape[1]
        self.out_features = vocab + codes.shape[0]
        self.bias = None

    @property
    def weight(self) -> _Rows:
        return _Rows(self.codes, self.vocab)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden, self.codes.to(hidden.dtype))
        return F.pad(logits, (self.vocab, 0), value=float("-inf"))


class _Rows:
    """The head's rows by token id, as `head.weight[cols]`, without materialising text rows."""

    def __init__(self, codes: Tensor, vocab: int):
        self.codes, self.vocab = codes, vocab
        self.shape = (vocab + codes.shape[0], codes.shape[1])
        self.dtype, self.device = codes.dtype, codes.device

    def __getitem__(self, cols):
        if isinstance(cols, slice | tuple):  # the fingerprint's sample: code rows only
            return self.codes[cols]
        cols = torch.as_tensor(cols)
        if bool((cols < self.vocab).any()):
            raise IndexError("a coded backbone's head has no rows for text tokens")
        return self.codes[cols - self.vocab]


MAX_LOGIT = 20.0  # a code's logit where the normed hidden state points exactly at its row
LEVEL_TAG = 0.5  # weight of a row's level direction beside its content direction


def code_rows(backbone: Backbone, codes: ItemCodes, seed: int = 0) -> tuple[Tensor, Tensor]:
    """[codes, H] input and output rows. A residual level's code points where its centroid
    points in the LSA space (through a fixed random orthonormal map into H), plus a direction
    for its level; the collision level's codes are random. Inputs have the text embeddings'
    mean norm, outputs MAX_LOGIT ÷ the final norm's scale."""
    H, C = backbone.hidden_size, codes.config.codebook
    gen = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(codes.num_tokens, H, generator=gen), dim=1)
    levels = F.normalize(torch.randn(codes.length, H, generator=gen), dim=1)
    for level, centroids in enumerate(codes.centroids):
        d = centroids.shape[1]
        q = torch.linalg.qr(torch.randn(max(d, H), min(d, H), generator=gen))[0]
        project = q.T if d <= H else q  # [d, H], orthonormal rows or columns
        content = torch.as_tensor(centroids, dtype=torch.float32) @ project
        rows[level * C : level * C + len(content)] = F.normalize(content, dim=1)
    for level in range(codes.length):
        block = slice(level * C, (level + 1) * C)
        rows[block] = F.normalize(rows[block] + LEVEL_TAG * levels[level], dim=1)
    text = backbone.model.get_input_embeddings().weight.detach().float()
    normed = backbone.final_norm.weight.detach().float().norm()  # |final_norm(h)| for typical h
    inputs, outputs = rows * text.norm(dim=1).mean(), rows * (MAX_LOGIT / normed)
    return inputs.to(backbone.dtype), outputs.to(backbone.dtype)


def coded_backbone(backbone: Backbone, codes: ItemCodes, *, seed: int = 0) -> Backbone:
    """`backbone` with one token per code after its vocabulary (ids vocab … vocab + n − 1);
    every original module is shared, not copied."""
    import copy

    model = backbone.model
    text = model.get_input_embeddings()
    shared = {id(m): m for m in model.modules() if m is not model and m is not model.base_model}
    shared |= {id(p): p for p in model.parameters()}
    coded = copy.deepcopy(model, memo=shared)
    num_codes = codes.num_tokens
    inputs, outputs = code_rows(backbone, codes, seed)
    vocab = backbone.vocab_size
    coded.set_input_embeddings(CodeEmbedding(text, inputs))
    coded.set_output_embeddings(CodeHead(vocab, outputs))
    coded.config.vocab_size = vocab + num_codes
    coded.config.tie_word_embeddings = False  # transformers must not re-tie the text rows
    return Backbone(coded, backbone.tokenizer, name=f"{backbone.name}+{num_codes}codes")
