"""SAM 2 mask decoder: output tokens + prompt tokens run through the two-way transformer with the
image embedding; mask tokens become per-mask dynamic 1x1 filters over the upscaled embedding.

Output token order inside the transformer: [obj_score_token?] iou_token, mask_tokens[0..M], prompts.
Mask token 0 is the single-mask output, tokens 1..M the multimask outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import MLP, LayerNorm2d, batch_invariant_linear

# Logit reported as "object present" when the decoder has no object-score head (sigmoid(10) ~ 1).
OBJECT_PRESENT_LOGIT = 10.0


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        # 4x upsampling: C -> C/4 -> C/8 channels (indices are checkpoint keys).
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied by the caller to the backbone's stride-4 / stride-8 maps before they are passed
            # in as high_res_features; they live here so checkpoint keys match.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1, stride=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1, stride=1)

        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3, batch_invariant=True)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
            batch_invariant=True,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3, batch_invariant=True)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )

        # For single-mask output at inference, fall back to the best multimask output when the
        # single mask is unstable under small logit threshold shifts.
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        image_embeddings [Bi, C, H, W]; image_pe [1, C, H, W]; sparse [B, N, C]; dense [B, C, H, W].
        repeat_image: repeat each image embedding B times (one image, many prompts).
        high_res_features: [feat_s0 [B, C/8, 4H, 4W], feat_s1 [B, C/4, 2H, 2W]] when enabled.

        Returns masks [B, K, 4H, 4W] logits, iou_pred [B, K], sam_tokens_out [B, 1 or 3, C],
        object_score_logits [B, 1], with K = num_multimask_outputs if multimask_output else 1.
        """
        all_masks, all_iou, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )

        if multimask_output:
            masks, iou_pred = all_masks[:, 1:], all_iou[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self.select_stable_single_mask(all_masks, all_iou)
        else:
            masks, iou_pred = all_masks[:, 0:1], all_iou[:, 0:1]

        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # The single-mask token is what tracking was trained on, so it is the object pointer
            # source even when multimask outputs are requested.
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def output_token_weights(self) -> Tensor:
        """Learned output tokens in transformer order, [T, C]."""
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
        return torch.cat(parts, dim=0)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        repeat_image: bool,
        high_res_features: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All mask-token outputs: masks [B, M, 4H, 4W], iou [B, M], mask tokens [B, M, C], obj logits [B, 1]."""
        batch = sparse_prompt_embeddings.shape[0]
        first_out = 1 if self.pred_obj_scores else 0  # index of the iou token
        output_tokens = self.output_token_weights().unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # [B, T + N, C]

        if repeat_image:
            image = torch.repeat_interleave(image_embeddings, batch, dim=0)
        else:
            assert image_embeddings.shape[0] == batch, "one image embedding per prompt set expected"
            image = image_embeddings
        image = image + dense_prompt_embeddings
        assert image_pe.shape[0] == 1, "image_pe should have batch size 1 (from get_dense_pe())"
        image_pe = torch.repeat_interleave(image_pe, batch, dim=0)
        _, channels, h, w = image.shape

        token_out, image_tokens = self.transformer(image, image_pe, tokens)
        iou_token_out = token_out[:, first_out]  # [B, C]
        mask_tokens_out = token_out[:, first_out + 1 : first_out + 1 + self.num_mask_tokens]  # [B, M, C]

        # Contiguous NCHW whatever the batch size: the transposed view looks channels-last to the convs
        # below when B > 1 (but not when B = 1), and the channel mean of LayerNorm2d rounds differently
        # in the two layouts. A batch of one already ran in NCHW, so this changes none of its bits.
        image = image_tokens.transpose(1, 2).reshape(batch, channels, h, w).contiguous()
        if self.use_high_res_features:
            assert high_res_features is not None, "decoder built with use_high_res_features needs them"
            deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(norm1(deconv1(image) + feat_s1))  # [B, C/4, 2H, 2W]
            upscaled = act2(deconv2(upscaled) + feat_s0)  # [B, C/8, 4H, 4W]
        else:
            upscaled = self.output_upscaling(image)

        # Each mask token becomes a C/8-dim filter applied at every upscaled pixel.
        filters = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [B, M, C/8]
        _, up_channels, up_h, up_w = upscaled.shape
        masks = (filters @ upscaled.reshape(batch, up_channels, up_h * up_w)).reshape(batch, -1, up_h, up_w)

        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, M]
        if self.pred_obj_scores:
            object_score_logits = batch_invariant_linear(self.pred_obj_score_head, token_out[:, 0])  # [B, 1]
        else:
            object_score_logits = iou_pred.new_full((batch, 1), OBJECT_PRESENT_LOGIT)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def stability_scores(self, mask_logits: Tensor) -> Tensor:
        """IoU of the masks thresholded at +delta and -delta, [..., H, W] -> [...]."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner_area = (flat > delta).sum(dim=-1).float()
        outer_area = (flat > -delta).sum(dim=-1).float()
        return torch.where(outer_area > 0, inner_area / outer_area, 1.0)

    def select_stable_single_mask(self, all_masks: Tensor, all_iou: Tensor) -> tuple[Tensor, Tensor]:
        """Single-mask output, replaced by the highest-IoU multimask output where it is unstable."""
        multi_masks, multi_iou = all_masks[:, 1:], all_iou[:, 1:]
        best = multi_iou.argmax(dim=-1)  # [B]
        rows = torch.arange(multi_iou.shape[0], device=all_iou.device)
        best_masks = multi_masks[rows, best].unsqueeze(1)  # [B, 1, H, W]
        best_iou = multi_iou[rows, best].unsqueeze(1)  # [B, 1]

        single_masks, single_iou = all_masks[:, 0:1], all_iou[:, 0:1]
        is_stable = self.stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh  # [B, 1]
        masks = torch.where(is_stable[..., None, None], single_masks, best_masks)
        iou_pred = torch.where(is_stable, single_iou, best_iou)
        return masks, iou_pred
