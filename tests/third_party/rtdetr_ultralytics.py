"""RT-DETR as ultralytics builds it (``rtdetr-l.yaml``): the whole program, decoder included.

Re-written in our own words from the public ultralytics files named in each docstring, keeping
the code shape a graph fuser meets end to end: the backbone and neck blocks of
:mod:`third_party.yolo` (``HGStem``'s asymmetric ``F.pad``, ``HGBlock``, ``DWConv``, ``RepC3``
with literal-0 ``RepConv`` sums), ``AIFI`` (a post-norm transformer encoder layer on the
flattened last level, its 2D sin-cos position embedding built from ``x.shape`` with
``torch.arange`` at every call), and the ``RTDETRDecoder`` head: ``input_proj`` as bare
``nn.Sequential(nn.Conv2d(bias=False), nn.BatchNorm2d)`` per level (the one conv+BN that
ultralytics' own ``BaseModel.fuse`` never folds), Python lists of ``[h, w]`` from
``feat.shape[2:]``, anchors cached on the instance behind ``if self.dynamic or self.shapes !=
shapes``, ``torch.topk(...).indices.view(-1)`` query selection and advanced-index gathers,
``nn.MultiheadAttention`` self-attention on transposed queries, ``MSDeformAttn`` cross-attention
through ``F.grid_sample`` and the iterative box refinement that stops at ``eval_idx``.

The model is ``RTDETRDetectionModel``'s: ``forward(x, *args, **kwargs)`` -> ``predict(x,
profile=False, visualize=False, batch=None, augment=False, embed=None)``, which routes through
``self.model[:-1]`` with ``m.f`` / ``m.i`` / ``self.save`` and calls the head with the list of
features and ``batch``.

Deviations from the public code, on purpose: it is tiny (channels 16-32, hidden_dim 32, three
levels, 12 queries, two decoder layers, nc=4); contrastive denoising (``get_cdn_group``) is
kept only as its eval/no-batch early return (the training path raises); the loss is left out;
``profile`` times without thop and ``visualize`` saves nothing.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import constant_, uniform_, xavier_uniform_

from . import Idiom
from .yolo import BaseModel, Concat, Conv, DWConv, HGBlock, HGStem, RepC3, ultralytics_fuse

# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/utils.py
# ----------------------------------------------------------------------------------------


def _get_clones(module, n):
    """``n`` independent deep copies of ``module`` in a ModuleList (ultralytics ``_get_clones``)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def bias_init_with_prob(prior_prob=0.01):
    """The logit of ``prior_prob``: a classification bias giving that initial probability."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def linear_init(module):
    """Weight and bias of a linear uniform in +-1/sqrt(out features) (ultralytics ``linear_init``)."""
    bound = 1 / math.sqrt(module.weight.shape[0])
    uniform_(module.weight, -bound, bound)
    if hasattr(module, "bias") and module.bias is not None:
        uniform_(module.bias, -bound, bound)


def inverse_sigmoid(x, eps=1e-5):
    """ultralytics ``inverse_sigmoid``: clamp to [0, 1], then log(x / (1 - x)) with both sides
    clamped away from zero."""
    x = x.clamp(min=0, max=1)
    num = x.clamp(min=eps)
    den = (1 - x).clamp(min=eps)
    return torch.log(num / den)


def multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations,
                                        attention_weights):
    """ultralytics ``multi_scale_deformable_attn_pytorch`` (after detrex): per level, the value
    tokens reshaped to ``(bs * heads, dims, H, W)`` and sampled by ``F.grid_sample`` at the
    locations mapped to [-1, 1]; the samples weighted and summed over levels and points."""
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    per_level = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (H_, W_) in enumerate(value_spatial_shapes):
        # (bs, H*W, heads, dims) -> (bs*heads, dims, H, W)
        value_l_ = per_level[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, embed_dims, H_, W_)
        # (bs, queries, heads, points, 2) -> (bs*heads, queries, points, 2)
        grid_l_ = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l_, grid_l_, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (bs, queries, heads, levels, points) -> (bs*heads, 1, queries, levels*points)
    attention_weights = attention_weights.transpose(1, 2).reshape(
        bs * num_heads, 1, num_queries, num_levels * num_points)
    output = ((torch.stack(sampled, dim=-2).flatten(-2) * attention_weights)
              .sum(-1)
              .view(bs, num_heads * embed_dims, num_queries))
    return output.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/transformer.py
# ----------------------------------------------------------------------------------------


class TransformerEncoderLayer(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py: TransformerEncoderLayer —
    ``nn.MultiheadAttention(batch_first=True)`` named ``ma``, FFN ``fc1``/``fc2``, pre- or
    post-norm chosen in Python; the default ``act`` is one ``nn.GELU()`` made at definition time
    and shared by every layer that does not pass one."""

    def __init__(self, c1, cm=2048, num_heads=8, dropout=0.0, act=nn.GELU(),  # noqa: B008
                 normalize_before=False):
        super().__init__()
        self.ma = nn.MultiheadAttention(c1, num_heads, dropout=dropout, batch_first=True)
        self.fc1 = nn.Linear(c1, cm)
        self.fc2 = nn.Linear(cm, c1)
        self.norm1 = nn.LayerNorm(c1)
        self.norm2 = nn.LayerNorm(c1)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.act = act
        self.normalize_before = normalize_before

    @staticmethod
    def with_pos_embed(tensor, pos=None):
        return tensor if pos is None else tensor + pos

    def forward_post(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        q = k = self.with_pos_embed(src, pos)
        attended = self.ma(q, k, value=src, attn_mask=src_mask,
                           key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.fc2(self.dropout(self.act(self.fc1(src))))
        return self.norm2(src + self.dropout2(hidden))

    def forward_pre(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        normed = self.norm1(src)
        q = k = self.with_pos_embed(normed, pos)
        attended = self.ma(q, k, value=normed, attn_mask=src_mask,
                           key_padding_mask=src_key_padding_mask)[0]
        src = src + self.dropout1(attended)
        hidden = self.fc2(self.dropout(self.act(self.fc1(self.norm2(src)))))
        return src + self.dropout2(hidden)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        if self.normalize_before:
            return self.forward_pre(src, src_mask, src_key_padding_mask, pos)
        return self.forward_post(src, src_mask, src_key_padding_mask, pos)


class AIFI(TransformerEncoderLayer):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py: AIFI — ``c, h, w =
    x.shape[1:]`` (unpacking a shape: symbolic tracing stops here), a 2D sin-cos embedding built
    in float32 from those ints on every call (with an ``assert`` on ``embed_dim``), cast to the
    input's dtype, the encoder layer on ``(B, HW, C)`` tokens, then ``permute`` / ``view`` /
    ``contiguous`` back to NCHW."""

    def __init__(self, c1, cm=2048, num_heads=8, dropout=0, act=nn.GELU(),  # noqa: B008
                 normalize_before=False):
        super().__init__(c1, cm, num_heads, dropout, act, normalize_before)

    def forward(self, x):
        c, h, w = x.shape[1:]
        pos_embed = self.build_2d_sincos_position_embedding(w, h, c)
        tokens = x.flatten(2).permute(0, 2, 1)  # (B, C, H, W) -> (B, HW, C)
        x = super().forward(tokens, pos=pos_embed.to(device=x.device, dtype=x.dtype))
        return x.permute(0, 2, 1).view([-1, c, h, w]).contiguous()

    @staticmethod
    def build_2d_sincos_position_embedding(w, h, embed_dim=256, temperature=10000.0):
        assert embed_dim % 4 == 0, "the 2D sin-cos embedding needs embed_dim divisible by 4"
        grid_w = torch.arange(w, dtype=torch.float32)
        grid_h = torch.arange(h, dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
        pos_dim = embed_dim // 4
        omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
        omega = 1.0 / (temperature ** omega)
        out_w = grid_w.flatten()[..., None] @ omega[None]
        out_h = grid_h.flatten()[..., None] @ omega[None]
        return torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], 1)[None]


class MLP(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py: MLP — Linears in a
    ModuleList, ``act`` between them; ``forward`` reads ``act`` / ``residual`` / ``out_norm`` /
    ``sigmoid`` through ``getattr`` with defaults (checkpoints from older releases lack them)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, act=nn.ReLU, sigmoid=False,
                 residual=False, out_norm=None):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim, *hidden], [*hidden, output_dim]))
        self.sigmoid = sigmoid
        self.act = act()
        if residual and input_dim != output_dim:
            raise ValueError("a residual MLP needs input_dim == output_dim")
        self.residual = residual
        assert isinstance(out_norm, nn.Module) or out_norm is None
        self.out_norm = out_norm or nn.Identity()

    def forward(self, x):
        start = x
        for i, layer in enumerate(self.layers):
            x = getattr(self, "act", nn.ReLU())(layer(x)) if i < self.num_layers - 1 else layer(x)
        if getattr(self, "residual", False):
            x = x + start
        x = getattr(self, "out_norm", nn.Identity())(x)
        return x.sigmoid() if getattr(self, "sigmoid", False) else x


class MSDeformAttn(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py: MSDeformAttn —
    ``sampling_offsets`` / ``attention_weights`` Linears on the query, ``value_proj`` on the
    flattened multi-level features, ``assert sum(h * w) == len_v`` over the Python shapes
    list, a softmax over levels*points, offsets scaled by the reference box (4-d references) or
    divided by ``torch.as_tensor(shapes).flip(-1)`` (2-d), then the pure-PyTorch
    ``F.grid_sample`` kernel and ``output_proj``."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        per_head = d_model // n_heads
        assert per_head * n_heads == d_model, "`d_model` must be divisible by `n_heads`"
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Zero offset weights with a bias fanning the heads' points out on a circle (point i
        at radius i+1); zero attention weights; xavier value/output projections."""
        constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = ((grid / grid.abs().max(-1, keepdim=True)[0])
                .view(self.n_heads, 1, 1, 2)
                .repeat(1, self.n_levels, self.n_points, 1))
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query, refer_bbox, value, value_shapes, value_mask=None):
        bs, len_q = query.shape[:2]
        len_v = value.shape[1]
        assert sum(s[0] * s[1] for s in value_shapes) == len_v

        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(value_mask[..., None], float(0))
        value = value.view(bs, len_v, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            bs, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(
            bs, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(
            bs, len_q, self.n_heads, self.n_levels, self.n_points)
        num_points = refer_bbox.shape[-1]
        if num_points == 2:
            normalizer = torch.as_tensor(value_shapes, dtype=query.dtype, device=query.device).flip(-1)
            add = sampling_offsets / normalizer[None, None, None, :, None, :]
            sampling_locations = refer_bbox[:, :, None, :, None, :] + add
        elif num_points == 4:
            add = sampling_offsets / self.n_points * refer_bbox[:, :, None, :, None, 2:] * 0.5
            sampling_locations = refer_bbox[:, :, None, :, None, :2] + add
        else:
            raise ValueError(f"reference boxes must have 2 or 4 coordinates, not {num_points}")
        output = multi_scale_deformable_attn_pytorch(value, value_shapes, sampling_locations,
                                                     attention_weights)
        return self.output_proj(output)


class DeformableTransformerDecoderLayer(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py:
    DeformableTransformerDecoderLayer — sequence-first ``nn.MultiheadAttention`` fed
    ``transpose(0, 1)`` views, ``norm1``; ``MSDeformAttn`` on ``refer_bbox.unsqueeze(2)``,
    ``norm2``; FFN ``linear1`` -> ``act`` -> ``linear2``, ``norm3`` (post-norm throughout)."""

    def __init__(self, d_model=256, n_heads=8, d_ffn=1024, dropout=0.0, act=nn.ReLU(),  # noqa: B008
                 n_levels=4, n_points=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.act = act
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, tgt):
        hidden = self.linear2(self.dropout3(self.act(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(hidden))

    def forward(self, embed, refer_bbox, feats, shapes, padding_mask=None, attn_mask=None,
                query_pos=None):
        q = k = self.with_pos_embed(embed, query_pos)
        tgt = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), embed.transpose(0, 1),
                             attn_mask=attn_mask)[0].transpose(0, 1)
        embed = self.norm1(embed + self.dropout1(tgt))

        tgt = self.cross_attn(self.with_pos_embed(embed, query_pos), refer_bbox.unsqueeze(2), feats,
                              shapes, padding_mask)
        embed = self.norm2(embed + self.dropout2(tgt))
        return self.forward_ffn(embed)


class DeformableTransformerDecoder(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/transformer.py: DeformableTransformerDecoder
    — cloned layers; the box and score heads and the query-position MLP are passed in by the
    caller; each layer refines ``sigmoid(bbox + inverse_sigmoid(refer_bbox))``; in eval the
    loop ``break``s at ``eval_idx`` after one score head, in training every layer is scored
    and references are ``detach``ed."""

    def __init__(self, hidden_dim, decoder_layer, num_layers, eval_idx=-1):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def forward(self, embed, refer_bbox, feats, shapes, bbox_head, score_head, pos_mlp,
                attn_mask=None, padding_mask=None):
        output = embed
        dec_bboxes = []
        dec_cls = []
        last_refined_bbox = None
        refer_bbox = refer_bbox.sigmoid()
        for i, layer in enumerate(self.layers):
            output = layer(output, refer_bbox, feats, shapes, padding_mask, attn_mask, pos_mlp(refer_bbox))

            bbox = bbox_head[i](output)
            refined_bbox = torch.sigmoid(bbox + inverse_sigmoid(refer_bbox))

            if self.training:
                dec_cls.append(score_head[i](output))
                if i == 0:
                    dec_bboxes.append(refined_bbox)
                else:
                    dec_bboxes.append(torch.sigmoid(bbox + inverse_sigmoid(last_refined_bbox)))
            elif i == self.eval_idx:
                dec_cls.append(score_head[i](output))
                dec_bboxes.append(refined_bbox)
                break

            last_refined_bbox = refined_bbox
            refer_bbox = refined_bbox.detach() if self.training else refined_bbox

        return torch.stack(dec_bboxes), torch.stack(dec_cls)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/models/utils/ops.py (only the early return)
# ----------------------------------------------------------------------------------------


def get_cdn_group(batch, num_classes, num_queries, class_embed, num_dn=100, cls_noise_ratio=0.5,
                  box_noise_scale=1.0, training=False):
    """ultralytics ``get_cdn_group``: contrastive denoising queries for training. Outside
    training, without a batch or with ``num_dn <= 0`` it returns four Nones (the path eval
    always takes); the training path itself is not part of this corpus."""
    if (not training) or num_dn <= 0 or batch is None:
        return None, None, None, None
    raise NotImplementedError("contrastive denoising groups (training only) are not re-written here")


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/modules/head.py
# ----------------------------------------------------------------------------------------


class RTDETRDecoder(nn.Module):
    """ultralytics/ultralytics ultralytics/nn/modules/head.py: RTDETRDecoder — class attributes
    ``shapes = []``, ``anchors`` / ``valid_mask`` empty tensors and ``dynamic``; anchors
    regenerated into plain instance attributes (not buffers) whenever the Python list of level
    shapes changes; ``input_proj`` a ModuleList of ``nn.Sequential(nn.Conv2d(bias=False),
    nn.BatchNorm2d)``; ``enc_output`` Linear + LayerNorm on ``valid_mask * feats``; top-k query
    selection; eval returns ``(y, x)`` with ``y = cat(boxes, sigmoid(scores))`` (``y`` alone
    when ``export``)."""

    export = False
    shapes = []
    anchors = torch.empty(0)
    valid_mask = torch.empty(0)
    dynamic = False

    def __init__(self, nc=80, ch=(512, 1024, 2048), hd=256, nq=300, ndp=4, nh=8, ndl=6, d_ffn=1024,
                 dropout=0.0, act=nn.ReLU(), eval_idx=-1, nd=100, label_noise_ratio=0.5,  # noqa: B008
                 box_noise_scale=1.0, learnt_init_query=False):
        super().__init__()
        self.hidden_dim = hd
        self.nhead = nh
        self.nl = len(ch)
        self.nc = nc
        self.num_queries = nq
        self.num_decoder_layers = ndl

        # per-level projection to the hidden width (kept as Sequential for checkpoint keys)
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(x, hd, 1, bias=False), nn.BatchNorm2d(hd))
                                        for x in ch)

        layer = DeformableTransformerDecoderLayer(hd, nh, d_ffn, dropout, act, self.nl, ndp)
        self.decoder = DeformableTransformerDecoder(hd, layer, ndl, eval_idx)

        # denoising (training only)
        self.denoising_class_embed = nn.Embedding(nc, hd)
        self.num_denoising = nd
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

        # query embedding
        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = nn.Embedding(nq, hd)
        self.query_pos_head = MLP(4, 2 * hd, hd, num_layers=2)

        # encoder head
        self.enc_output = nn.Sequential(nn.Linear(hd, hd), nn.LayerNorm(hd))
        self.enc_score_head = nn.Linear(hd, nc)
        self.enc_bbox_head = MLP(hd, hd, 4, num_layers=3)

        # decoder heads, one per layer
        self.dec_score_head = nn.ModuleList([nn.Linear(hd, nc) for _ in range(ndl)])
        self.dec_bbox_head = nn.ModuleList([MLP(hd, hd, 4, num_layers=3) for _ in range(ndl)])

        self._reset_parameters()

    def forward(self, x, batch=None):
        feats, shapes = self._get_encoder_input(x)

        dn_embed, dn_bbox, attn_mask, dn_meta = get_cdn_group(
            batch, self.nc, self.num_queries, self.denoising_class_embed.weight, self.num_denoising,
            self.label_noise_ratio, self.box_noise_scale, self.training)

        embed, refer_bbox, enc_bboxes, enc_scores = self._get_decoder_input(feats, shapes, dn_embed, dn_bbox)

        dec_bboxes, dec_scores = self.decoder(embed, refer_bbox, feats, shapes, self.dec_bbox_head,
                                              self.dec_score_head, self.query_pos_head,
                                              attn_mask=attn_mask)
        x = dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta
        if self.training:
            return x
        # (bs, num_queries, 4 + nc)
        y = torch.cat((dec_bboxes.squeeze(0), dec_scores.squeeze(0).sigmoid()), -1)
        return y if self.export else (y, x)

    @staticmethod
    def _generate_anchors(shapes, grid_size=0.05, dtype=torch.float32, device="cpu", eps=1e-2):
        """Per level, cell centres over (w, h) and a width/height of ``grid_size * 2**level``,
        as logits; anchors too close to the border are masked with +inf."""
        anchors = []
        for i, (h, w) in enumerate(shapes):
            sy = torch.arange(end=h, dtype=dtype, device=device)
            sx = torch.arange(end=w, dtype=dtype, device=device)
            grid_y, grid_x = torch.meshgrid(sy, sx, indexing="ij")
            grid_xy = torch.stack([grid_x, grid_y], -1)  # (h, w, 2)

            valid_WH = torch.tensor([w, h], dtype=dtype, device=device)
            grid_xy = (grid_xy.unsqueeze(0) + 0.5) / valid_WH  # (1, h, w, 2)
            wh = torch.ones_like(grid_xy, dtype=dtype, device=device) * grid_size * (2.0 ** i)
            anchors.append(torch.cat([grid_xy, wh], -1).view(-1, h * w, 4))  # (1, h*w, 4)

        anchors = torch.cat(anchors, 1)
        valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        anchors = anchors.masked_fill(~valid_mask, float("inf"))
        return anchors, valid_mask

    def _get_encoder_input(self, x):
        x = [self.input_proj[i](feat) for i, feat in enumerate(x)]
        feats = []
        shapes = []
        for feat in x:
            h, w = feat.shape[2:]
            feats.append(feat.flatten(2).permute(0, 2, 1))  # (b, c, h, w) -> (b, h*w, c)
            shapes.append([h, w])
        return torch.cat(feats, 1), shapes

    def _get_decoder_input(self, feats, shapes, dn_embed=None, dn_bbox=None):
        bs = feats.shape[0]
        if self.dynamic or self.shapes != shapes:
            self.anchors, self.valid_mask = self._generate_anchors(shapes, dtype=feats.dtype, device=feats.device)
            self.shapes = shapes

        features = self.enc_output(self.valid_mask * feats)  # (bs, h*w, hd)
        enc_outputs_scores = self.enc_score_head(features)  # (bs, h*w, nc)

        # query selection: the best class score of every token, top num_queries per image
        topk_ind = torch.topk(enc_outputs_scores.max(-1).values, self.num_queries, dim=1).indices.view(-1)
        batch_ind = torch.arange(end=bs, dtype=topk_ind.dtype).unsqueeze(-1).repeat(1, self.num_queries).view(-1)

        top_k_features = features[batch_ind, topk_ind].view(bs, self.num_queries, -1)
        top_k_anchors = self.anchors[:, topk_ind].view(bs, self.num_queries, -1)

        # dynamic anchors + static content
        refer_bbox = self.enc_bbox_head(top_k_features) + top_k_anchors

        enc_bboxes = refer_bbox.sigmoid()
        if dn_bbox is not None:
            refer_bbox = torch.cat([dn_bbox, refer_bbox], 1)
        enc_scores = enc_outputs_scores[batch_ind, topk_ind].view(bs, self.num_queries, -1)

        embeddings = (self.tgt_embed.weight.unsqueeze(0).repeat(bs, 1, 1) if self.learnt_init_query
                      else top_k_features)
        if self.training:
            refer_bbox = refer_bbox.detach()
            if not self.learnt_init_query:
                embeddings = embeddings.detach()
        if dn_embed is not None:
            embeddings = torch.cat([dn_embed, embeddings], 1)
        return embeddings, refer_bbox, enc_bboxes, enc_scores

    def _reset_parameters(self):
        bias_cls = bias_init_with_prob(0.01) / 80 * self.nc
        constant_(self.enc_score_head.bias, bias_cls)
        constant_(self.enc_bbox_head.layers[-1].weight, 0.0)
        constant_(self.enc_bbox_head.layers[-1].bias, 0.0)
        for cls_, reg_ in zip(self.dec_score_head, self.dec_bbox_head):
            constant_(cls_.bias, bias_cls)
            constant_(reg_.layers[-1].weight, 0.0)
            constant_(reg_.layers[-1].bias, 0.0)
        linear_init(self.enc_output[0])
        xavier_uniform_(self.enc_output[0].weight)
        if self.learnt_init_query:
            xavier_uniform_(self.tgt_embed.weight)
        xavier_uniform_(self.query_pos_head.layers[0].weight)
        xavier_uniform_(self.query_pos_head.layers[1].weight)
        for layer in self.input_proj:
            xavier_uniform_(layer[0].weight)


# ----------------------------------------------------------------------------------------
# ultralytics/ultralytics ultralytics/nn/tasks.py
# ----------------------------------------------------------------------------------------


def feature_visualization(x, module_type, stage, save_dir=None):
    """Stand-in for ultralytics ``feature_visualization`` (which saves feature-map PNGs)."""
    return None


class RTDETRDetectionModel(BaseModel):
    """ultralytics/ultralytics ultralytics/nn/tasks.py: BaseModel.forward, RTDETRDetectionModel
    — ``forward(x, *args, **kwargs)`` sends a dict to ``loss`` and anything else to
    ``predict(x, profile, visualize, batch, augment, embed)``, whose loop runs
    ``self.model[:-1]`` (routing by ``m.f``, saving by ``m.i in self.save``, ``embed`` early
    exit) and then calls the head on ``[y[j] for j in head.f]`` and ``batch``. ``fuse`` is
    ``BaseModel.fuse`` (conv+BN of Conv/DWConv, RepConv.fuse_convs, instance forwards patched);
    it leaves the decoder's ``input_proj`` Sequentials alone."""

    def __init__(self, layers):
        super().__init__(layers)
        for m in self.model:
            m.type = f"{type(m).__module__}.{type(m).__name__}"

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):  # training / validation while training
            return self.loss(x, *args, **kwargs)
        return self.predict(x, *args, **kwargs)

    def loss(self, batch, preds=None):
        raise NotImplementedError("the RT-DETR loss is not part of the corpus")

    def _profile_one_layer(self, m, x, dt):
        start = time.perf_counter()
        for _ in range(3):
            m(x.copy() if isinstance(x, list) else x)
        dt.append((time.perf_counter() - start) * 100)

    def predict(self, x, profile=False, visualize=False, batch=None, augment=False, embed=None):
        y, dt, embeddings = [], [], []
        embed = frozenset(embed) if embed is not None else {-1}
        max_idx = max(embed)
        for m in self.model[:-1]:  # the head runs after the loop
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if profile:
                self._profile_one_layer(m, x, dt)
            x = m(x)
            y.append(x if m.i in self.save else None)
            if visualize:
                feature_visualization(x, m.type, m.i, save_dir=visualize)
            if m.i in embed:
                embeddings.append(F.adaptive_avg_pool2d(x, (1, 1)).squeeze(-1).squeeze(-1))
                if m.i == max_idx:
                    return torch.unbind(torch.cat(embeddings, 1), dim=0)
        head = self.model[-1]
        return head([y[j] for j in head.f], batch)


def _rtdetr_l_layers(nc=4, hd=32, nq=12, ndl=2):
    """``rtdetr-l.yaml`` at toy width (backbone stage 3 has two HGBlocks, HGBlocks two convs,
    RepC3 two RepConvs). 64x64 input: levels 8x8, 4x4, 2x2."""
    return [
        # backbone
        (-1, HGStem(3, 8, 16)),                                 # 0  P2/4
        (-1, HGBlock(16, 8, 32, 3, 2)),                         # 1  stage 1
        (-1, DWConv(32, 32, 3, 2, 1, False)),                   # 2  P3/8
        (-1, HGBlock(32, 16, 32, 3, 2)),                        # 3  stage 2
        (-1, DWConv(32, 32, 3, 2, 1, False)),                   # 4  P4/16
        (-1, HGBlock(32, 16, 32, 5, 2, True, False)),           # 5  stage 3
        (-1, HGBlock(32, 16, 32, 5, 2, True, True)),            # 6
        (-1, DWConv(32, 32, 3, 2, 1, False)),                   # 7  P5/32
        (-1, HGBlock(32, 16, 32, 5, 2, True, False)),           # 8  stage 4
        # head
        (-1, Conv(32, 16, 1, 1, None, 1, 1, False)),            # 9  input_proj.2
        (-1, AIFI(16, 32, 2)),                                  # 10
        (-1, Conv(16, 16, 1, 1)),                               # 11 Y5, lateral_convs.0
        (-1, nn.Upsample(None, 2, "nearest")),                  # 12
        (6, Conv(32, 16, 1, 1, None, 1, 1, False)),             # 13 input_proj.1
        ([-2, -1], Concat(1)),                                  # 14
        (-1, RepC3(32, 16, 2)),                                 # 15 fpn_blocks.0
        (-1, Conv(16, 16, 1, 1)),                               # 16 Y4, lateral_convs.1
        (-1, nn.Upsample(None, 2, "nearest")),                  # 17
        (3, Conv(32, 16, 1, 1, None, 1, 1, False)),             # 18 input_proj.0
        ([-2, -1], Concat(1)),                                  # 19
        (-1, RepC3(32, 16, 2)),                                 # 20 X3, fpn_blocks.1
        (-1, Conv(16, 16, 3, 2)),                               # 21 downsample_convs.0
        ([-1, 16], Concat(1)),                                  # 22 cat Y4
        (-1, RepC3(32, 16, 2)),                                 # 23 F4, pan_blocks.0
        (-1, Conv(16, 16, 3, 2)),                               # 24 downsample_convs.1
        ([-1, 11], Concat(1)),                                  # 25 cat Y5
        (-1, RepC3(32, 16, 2)),                                 # 26 F5, pan_blocks.1
        ([20, 23, 26], RTDETRDecoder(nc, (16, 16, 16), hd=hd, nq=nq, ndp=4, nh=4, ndl=ndl,
                                     d_ffn=2 * hd)),            # 27
    ]


def build_rtdetr_l():
    """The model as a trained checkpoint holds it: built, then run once (ultralytics'
    ``Exporter`` and predictor warm-ups do the same) so that the decoder's ``anchors`` /
    ``valid_mask`` / ``shapes`` are cached on the instance for the 64x64 input. They stay
    float32 after ``.to(torch.float64)`` (plain attributes; ``BaseModel._apply`` converts
    only a ``Detect`` head's). Uncached, ``torch.export`` would generate them during
    capture and leave FakeTensors on the module (torch warns "tensor attributes ... were
    assigned during export"), breaking every later eager call."""
    model = RTDETRDetectionModel(_rtdetr_l_layers())
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    return model.train()


_ULTRA = "ultralytics/ultralytics ultralytics"

IDIOMS: list[Idiom] = [
    Idiom(
        name="ultralytics.rtdetr_l_decoder",
        library="ultralytics",
        source=f"{_ULTRA}/cfg/models/rt-detr/rtdetr-l.yaml; "
               f"{_ULTRA}/nn/tasks.py: BaseModel.forward, BaseModel.fuse, RTDETRDetectionModel.predict; "
               f"{_ULTRA}/nn/modules/head.py: RTDETRDecoder; "
               f"{_ULTRA}/nn/modules/transformer.py: AIFI, TransformerEncoderLayer, MLP, MSDeformAttn, "
               "DeformableTransformerDecoderLayer, DeformableTransformerDecoder; "
               f"{_ULTRA}/nn/modules/utils.py: multi_scale_deformable_attn_pytorch, inverse_sigmoid; "
               f"{_ULTRA}/nn/modules/block.py: HGStem, HGBlock, RepC3; "
               f"{_ULTRA}/nn/modules/conv.py: Conv, DWConv, RepConv, Concat",
        build=build_rtdetr_l,
        input_shape=(2, 3, 64, 64),
        reparameterize=ultralytics_fuse,
        traceable=False,
        whole_program=True,
        exportable=True,
        notes="Whole RT-DETR-l program: HGNet backbone, AIFI, RepC3 neck and the RTDETRDecoder "
              "(top-k query selection, MSDeformAttn via grid_sample, eval output (y, x)). "
              "BaseModel.fuse folds Conv/DWConv/RepConv but not the decoder's "
              "input_proj Sequential(Conv2d, BatchNorm2d). AIFI's 'c, h, w = x.shape[1:]' and "
              "the decoder's 'h, w = feat.shape[2:]' stop symbolic_trace (both are leaves). "
              "Built warm, as checkpoints are: anchors cached on the instance (plain float32 "
              "attributes, untouched by .to(float64)); uncached, torch.export would leave "
              "FakeTensor anchors on the module. "
              "torch.topk reorders near-ties in fp32, so fp32 comparisons between two "
              "differently rounded models are not meaningful (only float64 is).",
    ),
]
