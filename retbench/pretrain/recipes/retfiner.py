"""RetFiner: vision-language refinement of an existing retinal encoder (Fecso et al., MICCAI 2025).

The seed (the ronnief1/RetFiner README, Fig. 1) trains a vision encoder initialised from an
existing foundation model together with a BERT text encoder on image-report pairs with four
objectives, and says: "Cross-attention layers are activated only during the forward passes for
ITM, MLM, and GM". Here:

- **ITC** (image-text contrastive): the vision encoder's pooled feature and the text tower's
  sentence embedding (text-only: no cross-attention), both projected and L2-normalised, CLIP loss
  with a learnable temperature; texts that are identical strings count as positives of each other
  (class descriptions repeat within a batch; distinct reports give plain CLIP).
- **Fusion encoder**: the *same* text tower with a cross-attention block (text queries, image-token
  keys/values, projected to the text width) inserted after the self-attention of each of its top
  ``fusion_layers`` layers. Only ITM, MLM and GM run through it.
- **ITM** (image-text matching): a 2-way head on the fused first token, over the batch's pairs plus,
  per image, one negative text and, per text, one negative image, each drawn with probability
  ∝ softmax of the (detached) ITC similarity among the non-matching candidates (hard negatives;
  never the pair itself nor an identical text). The text-only lower layers are shared with ITC (their
  hidden states are reused), so the pairs only re-run the fusion layers.
- **MLM**: 15% of the report's tokens (80% [MASK], 10% random, 10% kept) predicted from the fused
  encoder conditioned on the image (bidirectional self-attention).
- **GM** (generative): next-token prediction of the report with causal self-attention through all
  layers and cross-attention to the image (captioning), the [CLS] token serving as the start token.

MLM and GM predict tokens with separate transform heads and the tower's word embeddings as the
(tied) output matrix. The four losses are summed with weights ``extra["weights"]`` (1 each: the
README gives none). The GPU preset fine-tunes the whole text tower over the full vocabulary. The
CPU preset (a few minutes on the bundled corpus) trains only the tower's top 2 layers — they are
the fusion layers — with the embeddings and lower layers frozen, truncates texts to 40 tokens, and
restricts the MLM/GM output vocabulary to the tokens occurring in the data's texts
(``corpus_vocab``): the targets are the same, and the 30k-word output layer, the largest single
cost on CPU, shrinks to a few hundred rows.

``settings.init = "local:DIR"`` (e.g. a model written by the ``mae`` recipe) initialises the vision
encoder, whose architecture then comes from ``DIR/retbench_model.json``; otherwise the preset's
ViT starts from random weights. Intended text: ``--data csdi-reports`` (real English diagnostic
reports); task names give class descriptions instead. Export: the refined vision encoder with the
text tower, projections and temperature (the ITC space, usable for zero-shot).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retbench.pretrain.recipe import Preset, Recipe, color_jitter, random_resized_crop
from retbench.pretrain.recipes._text_common import (
    JointSpace,
    LayerInputs,
    build_text_tower,
    build_vision,
    equality,
    keyed_contrastive_loss,
    sample_texts,
    self_attention_mask,
    text_layers,
    tokenize,
    vision_tokens_and_pooled,
)
from retbench.pretrain.recipes.mae import VIT_CPU, VIT_GPU

WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "gm": 1.0}


def hard_negatives(similarity: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, one column drawn with probability ∝ softmax(similarity) among the non-positive columns.

    Returns the drawn column per row and whether the row had any non-positive column (rows
    without one get an arbitrary index and must be skipped). Uses the torch RNG.
    """
    candidates = ~positive
    weights = F.softmax(similarity.detach().float(), dim=1).masked_fill(positive, 0.0)
    underflow = weights.sum(1, keepdim=True) <= 0  # all candidates at ~0 probability: draw uniformly among them
    weights = torch.where(underflow, candidates.float(), weights)
    valid = candidates.any(dim=1)
    weights[~valid] = 1.0
    return torch.multinomial(weights, 1).squeeze(1), valid


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_ids: torch.Tensor,
                prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the non-special tokens chosen; of those 80% → [MASK], 10% → a random token of
    ``vocab_ids``, 10% kept. Returns the corrupted ids and the labels (the original id where chosen, -100 elsewhere).
    """
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, device=ids.device)
    out = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    random_ids = vocab_ids[torch.randint(len(vocab_ids), ids.shape, device=ids.device)]
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, out)
    return out, labels


def corpus_token_ids(tower: Any, items: list[Any]) -> torch.Tensor:
    """Sorted ids of every token in the data's texts (whole texts, no truncation) plus the special tokens."""
    texts = sorted({str(t).strip() for it in items for t in it.texts})
    ids = {int(i) for i in tower.tokenizer.all_special_ids}
    for start in range(0, len(texts), 256):
        for row in tower.tokenizer(texts[start:start + 256])["input_ids"]:
            ids.update(int(i) for i in row)
    return torch.tensor(sorted(ids), dtype=torch.long)


class TokenHead(nn.Module):
    """Dense + GELU + LayerNorm, then logits over the vocabulary with a shared (tied) output matrix."""

    def __init__(self, width: int, vocab: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, output_matrix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the tokens ``ids`` whose output embeddings are the rows of ``output_matrix``."""
        return F.linear(self.norm(F.gelu(self.dense(h))), output_matrix, self.bias[ids])


class RetFiner(Recipe):
    """ITC + ITM + MLM + GM refinement of a vision encoder with a BERT-style text tower."""

    name = "retfiner"
    description = ("RetFiner: refine a vision encoder with image-text contrastive, image-text matching (hard negatives), "
                   "image-conditioned masked language modelling and captioning; cross-attention only for ITM/MLM/GM.")
    needs_text = True
    presets = {
        "cpu": Preset(image_size=64, steps=120, batch_size=8, lr=1e-4, vision=VIT_CPU, weight_decay=0.05,
                      extra={"embed_dim": 256, "fusion_layers": 2, "max_tokens": 40, "mlm_prob": 0.15,
                             "weights": WEIGHTS, "text_trainable_layers": 2, "corpus_vocab": True}),
        "gpu": Preset(image_size=224, steps=10000, batch_size=64, lr=5e-5, vision=VIT_GPU, weight_decay=0.05, amp=True,
                      warmup_frac=0.05,
                      extra={"embed_dim": 256, "fusion_layers": 6, "max_tokens": 128, "mlm_prob": 0.15,
                             "weights": WEIGHTS, "text_trainable_layers": None, "corpus_vocab": False}),
    }

    vocab_ids: torch.Tensor  # buffers registered in __init__
    vocab_pos: torch.Tensor

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        from transformers.models.bert.modeling_bert import BertAttention

        e = settings.extra
        self.vision, self.vision_cfg = build_vision(settings)
        self.text = build_text_tower(settings.text_tower, e.get("text_trainable_layers"))
        config = self.text.encoder.config
        width, vocab = config.hidden_size, config.vocab_size
        self.n_layers = len(text_layers(self.text))
        self.fusion_layers = max(1, min(int(e["fusion_layers"]), self.n_layers))
        self.joint = JointSpace(self.vision.num_features, self.text.dim, e["embed_dim"])
        self.image_to_text = nn.Linear(self.vision.num_features, width)
        self.cross = nn.ModuleList(BertAttention(config, layer_idx=i, is_cross_attention=True)
                                   for i in range(self.fusion_layers))
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = TokenHead(width, vocab, config.layer_norm_eps)
        self.gm_head = TokenHead(width, vocab, config.layer_norm_eps)
        for module in [self.image_to_text, self.cross, self.itm_head, self.mlm_head, self.gm_head]:
            module.apply(_bert_init)
        self.max_tokens, self.mlm_prob = e.get("max_tokens"), float(e["mlm_prob"])
        self.weights = {**WEIGHTS, **e.get("weights", {})}
        tok = self.text.tokenizer
        self.special_ids = sorted({int(i) for i in tok.all_special_ids})
        self.mask_id = int(tok.mask_token_id)
        ids = corpus_token_ids(self.text, self.data.items) if e.get("corpus_vocab") else torch.arange(vocab)
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.register_buffer("vocab_pos", torch.full((vocab,), -1, dtype=torch.long).index_put_(
            (ids,), torch.arange(len(ids))), persistent=False)

    # ---- text paths ----------------------------------------------------------------------------
    def token_logits(self, head: TokenHead, h: torch.Tensor) -> torch.Tensor:
        """Logits over the output vocabulary (:attr:`vocab_ids`) with the tower's word embeddings as output matrix."""
        return head(h, self.text.encoder.embeddings.word_embeddings.weight[self.vocab_ids], self.vocab_ids)

    def fuse(self, h: torch.Tensor, key_mask: torch.Tensor, image: torch.Tensor, start: int, causal: bool) -> torch.Tensor:
        """Run text layers ``start..`` on hidden states ``h``; the top ``fusion_layers`` also cross-attend to ``image``."""
        layers = text_layers(self.text)
        mask = self_attention_mask(key_mask, causal, self.text.encoder.config._attn_implementation)
        first_cross = self.n_layers - self.fusion_layers
        layer: Any  # a transformers BertLayer (a ModuleList's items are typed Module)
        for i in range(start, self.n_layers):
            layer = layers[i]
            a, _ = layer.attention(h, mask)
            if i >= first_cross:
                a, _ = self.cross[i - first_cross](a, encoder_hidden_states=image)
            h = layer.feed_forward_chunk(a)
        return h

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The tower's input embeddings (word + position + type, normed)."""
        return self.text.encoder.embeddings(input_ids=ids)

    # ---- objectives ----------------------------------------------------------------------------
    def itm_loss(self, text_hidden: torch.Tensor, key_mask: torch.Tensor, image: torch.Tensor, similarity: torch.Tensor,
                 positive: torch.Tensor) -> torch.Tensor:
        """Matching loss over the pairs, a hard negative text per image and a hard negative image per text."""
        neg_text, ok_img = hard_negatives(similarity, positive)
        neg_image, ok_txt = hard_negatives(similarity.t(), positive.t())
        rows = torch.arange(len(similarity), device=similarity.device)
        img_rows, txt_rows = rows[ok_img.to(rows.device)], rows[ok_txt.to(rows.device)]
        t_idx = torch.cat([rows, neg_text.to(rows.device)[img_rows], txt_rows])
        i_idx = torch.cat([rows, img_rows, neg_image.to(rows.device)[txt_rows]])
        fused = self.fuse(text_hidden[t_idx], key_mask[t_idx], image[i_idx], self.n_layers - self.fusion_layers, False)
        labels = torch.cat([torch.ones(len(rows)), torch.zeros(len(img_rows) + len(txt_rows))]).long().to(fused.device)
        return F.cross_entropy(self.itm_head(fused[:, 0]).float(), labels)

    def mlm_loss(self, ids: torch.Tensor, key_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Masked-token prediction through the fused encoder (bidirectional, conditioned on the image)."""
        special = torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        corrupted, labels = mask_tokens(ids, special, self.mask_id, self.vocab_ids, self.mlm_prob)
        chosen = labels >= 0
        if not bool(chosen.any()):
            return image.sum() * 0.0
        h = self.fuse(self.embed_tokens(corrupted), key_mask, image, 0, False)
        return F.cross_entropy(self.token_logits(self.mlm_head, h[chosen]).float(), self.vocab_pos[labels[chosen]])

    def gm_loss(self, ids: torch.Tensor, key_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Next-token prediction of the text (causal self-attention, cross-attention to the image)."""
        h = self.fuse(self.embed_tokens(ids), key_mask, image, 0, True)
        valid = key_mask[:, 1:].bool()
        logits = self.token_logits(self.gm_head, h[:, :-1][valid])
        return F.cross_entropy(logits.float(), self.vocab_pos[ids[:, 1:][valid]])

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Mild crops and intensity jitter (no flips: reports may name sides), then ImageNet normalisation."""
        x = random_resized_crop(x, self.settings.image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1))
        return self.normalize(color_jitter(x, strength=0.2, p=0.5, grey_p=0.0))

    def objectives(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four losses (ITC, ITM, MLM, GM) on the batch's image-text pairs; empty without any pair."""
        sampled = sample_texts(self.data.items, indices)
        keep = [k for k, t in enumerate(sampled) if t is not None]
        if not keep:
            return {}
        indices, texts = indices[keep], [t for t in sampled if t is not None]
        tokens, pooled = vision_tokens_and_pooled(self.vision, self.augment(self.pixels(indices)))
        batch = tokenize(self.text, texts, self.max_tokens)
        with LayerInputs(text_layers(self.text)[self.n_layers - self.fusion_layers]) as seen:
            text_emb = self.text.embed(batch)  # text-only: the exported tower's own path
        img, txt = self.joint.image(pooled), self.joint.text(text_emb)
        scale = self.joint.scale()
        parts = {"itc": keyed_contrastive_loss(img, txt, scale, texts)}
        image = self.image_to_text(tokens)
        positive = (equality(texts) > 0).to(img.device)
        similarity = (scale * img @ txt.t()).detach()
        key_mask = batch["attention_mask"]
        parts["itm"] = self.itm_loss(seen.seen[0], key_mask, image, similarity, positive)
        parts["mlm"] = self.mlm_loss(batch["input_ids"], key_mask, image)
        parts["gm"] = self.gm_loss(batch["input_ids"], key_mask, image)
        return parts

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted sum of ITC, ITM, MLM and GM (each also logged)."""
        parts = self.objectives(indices)
        if not parts:  # no image-text pair in this batch (e.g. only unlabelled folder images)
            zero = self.joint.logit_scale * 0.0
            return {"loss": zero, **{k: zero.detach() for k in WEIGHTS}}
        loss = sum(self.weights[k] * v for k, v in parts.items())
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def after_step(self, step: int) -> None:
        """Keep the log-temperature within [0, log 100]."""
        self.joint.clamp_()

    def export(self) -> dict[str, Any]:
        """The refined vision encoder with the ITC space (text tower, projections, temperature)."""
        return {"vision": self.vision, "vision_cfg": self.vision_cfg, "text_tower": self.text, **self.joint.export()}


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation for new layers: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


RECIPE = RetFiner
