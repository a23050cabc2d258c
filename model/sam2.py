"""SAM 2 as one nn.Module: the architecture boxes plus the few top-level parameters.

Attribute names equal the official SAM2Base ones, so `state_dict()` keys match Meta's checkpoints.
This module holds no per-video state: per-object state lives in `ObjectTracker` / `MemoryBank`.

Shapes use S = image_size, h = w = S/16, C = hidden_dim (256), Cm = mem_dim (64).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from .common import MLP
from .config import ModelConfig
from .position_encoding import PositionEmbeddingSine, sine_embedding_1d
from .types import FrameEmbedding, MaskResult

if TYPE_CHECKING:
    from .batched_step import StepRequest
    from .tracker import ObjectTracker

NO_OBJECT_LOGIT = -1024.0  # mask logit written where the object is judged absent (official value)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# A mask prompt becomes logits of +-10 (sigmoid(-10) ~ 4.5e-5), as in the official predictor.
MASK_PROMPT_SCALE, MASK_PROMPT_BIAS = 20.0, -10.0
MAX_INPUT_PIXELS = 8192 * 8192  # refuse absurd frames before allocating float copies of them


@dataclass(frozen=True)
class DecoderOutput:
    """Mask-decoder result for B prompts on B frames (B is 1 for trackers)."""

    multimask_logits: torch.Tensor  # [B, M, S/4, S/4], M = 3 (multimask) or 1
    multimask_ious: torch.Tensor  # [B, M]
    low_res_logits: torch.Tensor  # [B, 1, S/4, S/4] the chosen mask
    high_res_logits: torch.Tensor  # [B, 1, S, S] the chosen mask, upsampled
    iou: torch.Tensor  # [B] IoU estimate of the chosen mask
    object_pointer: torch.Tensor  # [B, C]
    presence_logit: torch.Tensor  # [B, 1] object-presence logit


class SAM2Model(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        image_encoder: Optional[nn.Module],
        memory_attention: nn.Module,
        memory_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        c = config
        self.image_size = c.image_size
        self.hidden_dim, self.mem_dim = c.hidden_dim, c.mem_dim
        self.image_encoder = image_encoder  # None in tracker-only copies (see build_model)
        # Parameter-free; the same encoding the FPN neck attaches to the top level. Kept here so
        # tracker-only copies (no image encoder) can still condition on memory.
        self.image_position_encoding = PositionEmbeddingSine(c.hidden_dim, normalize=True, scale=None, temperature=10000)
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        # Turns a mask prompt into a mask-decoder input when computing its object pointer.
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(c.num_maskmem, 1, 1, c.mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c.hidden_dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c.hidden_dim))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, c.mem_dim)) if c.no_obj_embed_spatial else None
        self.obj_ptr_proj = MLP(c.hidden_dim, c.hidden_dim, c.hidden_dim, 3, batch_invariant=True)
        self.obj_ptr_tpos_proj = (
            nn.Linear(c.hidden_dim, c.mem_dim) if c.proj_tpos_enc_in_obj_ptrs else nn.Identity()
        )
        for p in (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc, self.no_obj_ptr):
            trunc_normal_(p, std=0.02)
        if self.no_obj_embed_spatial is not None:
            trunc_normal_(self.no_obj_embed_spatial, std=0.02)
        self._constant_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @property
    def precision(self) -> str:
        """"fp32" (exact) or "bf16" (autocast); see ModelConfig.precision."""
        return self.config.precision

    def compute_context(self):
        """Context every forward pass runs in: bfloat16 autocast for precision "bf16", nothing for "fp32"."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- image encoding ------------------------------------------------------------------------
    def preprocess(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] RGB (any size) -> normalised float [B, 3, S, S]; float [B, 3, S, S] passes through."""
        if isinstance(frames, np.ndarray) and not frames.flags.writeable:
            # Read-only arrays (the Ray object store hands them out) make torch warn, since tensors
            # cannot be read-only. uint8 input is only read here (.float() below allocates the
            # output), so aliasing it is safe and costs no copy; float input may be returned as
            # is, so it gets the one copy that makes the result safely writable.
            if frames.dtype == np.uint8:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    frames = torch.as_tensor(frames)
            else:
                frames = torch.from_numpy(np.array(frames))
        frames = torch.as_tensor(frames)
        S = self.image_size
        if frames.dtype == torch.uint8:
            if frames.dim() != 4 or frames.shape[-1] != 3:
                raise ValueError(f"uint8 frames must be [B, H, W, 3] RGB, got {tuple(frames.shape)}")
            if frames.shape[1] * frames.shape[2] > MAX_INPUT_PIXELS:
                raise ValueError(f"frame of {frames.shape[2]}x{frames.shape[1]} exceeds the {MAX_INPUT_PIXELS}-pixel cap")
            x = frames.to(self.device).permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-2:] != (S, S):
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
            return (x - mean) / std
        if frames.is_floating_point():
            if frames.dim() != 4 or tuple(frames.shape[1:]) != (3, S, S):
                raise ValueError(f"float frames must be normalised [B, 3, {S}, {S}], got {tuple(frames.shape)}")
            return frames.to(self.device, torch.float32)
        raise ValueError(f"frames must be uint8 [B, H, W, 3] or float [B, 3, S, S], got dtype {frames.dtype}")

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | np.ndarray) -> list[FrameEmbedding]:
        """One image-encoder forward pass for a batch of frames from any streams.

        The embeddings are float32 in either precision (they travel between processes as numpy arrays).
        """
        if self.image_encoder is None:
            raise RuntimeError("this model copy was built without its image encoder (tracking only); "
                               "build it with with_image_encoder=True to encode frames")
        x = self.preprocess(frames)
        with self.compute_context():
            fpn = self.image_encoder(x)["backbone_fpn"]  # [B,C,S/4,S/4], [B,C,S/8,S/8], [B,C,S/16,S/16]
            s0 = self.sam_mask_decoder.conv_s0(fpn[0])  # [B, C/8, S/4, S/4]
            s1 = self.sam_mask_decoder.conv_s1(fpn[1])  # [B, C/4, S/8, S/8]
        # Embeddings leave as float32 whatever the precision: they cross processes as numpy, which has no
        # bfloat16. Under "bf16" they were computed under bf16 autocast (the high-res maps are bf16 values;
        # the top level adds the FPN's float32 top-down path, as in the official model).
        s0, s1, top = s0.float(), s1.float(), fpn[2].float()
        return [FrameEmbedding(high_res_feats=(s0[i], s1[i]), image_embed=top[i]) for i in range(x.shape[0])]

    def _cached(self, key: tuple, make) -> torch.Tensor:
        if key not in self._constant_cache:
            self._constant_cache[key] = make()
        return self._constant_cache[key]

    def image_pos_embedding(self, h: int, w: int) -> torch.Tensor:
        """Sine position encoding of the top feature level, [h*w, 1, C] (depends only on the size)."""

        def make():
            dummy = torch.zeros(1, self.hidden_dim, h, w, device=self.device)
            return self.image_position_encoding(dummy).flatten(2).permute(2, 0, 1)

        return self._cached(("image_pos", h, w, self.device), make)

    def memory_pos_embedding(self, h: int, w: int) -> torch.Tensor:
        """Sine position encoding of a spatial memory, [h*w, 1, Cm] (the same for every frame)."""

        def make():
            dummy = torch.zeros(1, self.mem_dim, h, w, device=self.device)
            return self.memory_encoder.position_encoding(dummy).flatten(2).permute(2, 0, 1)

        return self._cached(("memory_pos", h, w, self.device), make)

    # ---- per-frame heads -----------------------------------------------------------------------
    def prompt_points(self, prompt, video_size: tuple[int, int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Video-pixel points/box -> model-input pixels [1, P, 2] and labels [1, P] (None without either).

        A box becomes two corner points labelled 2 and 3, placed before the clicks, as in the official model.
        """
        coords, labels = [], []
        if prompt.box is not None:
            coords.append(torch.as_tensor(prompt.box).reshape(2, 2))
            labels.append(torch.tensor([2, 3], dtype=torch.int32))
        if prompt.points is not None:
            coords.append(torch.as_tensor(prompt.points))
            labels.append(torch.as_tensor(prompt.labels, dtype=torch.int32))
        if not coords:
            return None
        h, w = video_size
        xy = torch.cat(coords).float() / torch.tensor([w, h], dtype=torch.float32) * self.image_size
        return xy[None].to(self.device), torch.cat(labels)[None].to(self.device)

    def decode(
        self,
        image_embed: torch.Tensor,  # [B, C, h, w] (memory-conditioned for trackers)
        high_res_feats: Sequence[torch.Tensor],  # [B, C/8, 4h, 4w], [B, C/4, 2h, 2w]
        point_coords: Optional[torch.Tensor],  # [B, P, 2] in model-input pixels
        point_labels: Optional[torch.Tensor],  # [B, P] int: 1 pos, 0 neg, 2/3 box corners, -1 pad
        mask_input: Optional[torch.Tensor],  # [B, 1, 4h, 4w] logits, or any size (resized)
        multimask: bool,
    ) -> DecoderOutput:
        B = image_embed.shape[0]
        if point_coords is None:
            point_coords = torch.zeros(B, 1, 2, device=image_embed.device)
            point_labels = -torch.ones(B, 1, dtype=torch.int32, device=image_embed.device)
        if mask_input is not None and tuple(mask_input.shape[-2:]) != self.sam_prompt_encoder.mask_input_size:
            mask_input = F.interpolate(
                mask_input.float(), size=self.sam_prompt_encoder.mask_input_size,
                mode="bilinear", align_corners=False, antialias=True,
            )
        sparse, dense = self.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=mask_input)
        logits, ious, tokens, presence = self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=list(high_res_feats),
        )
        present = presence > 0  # [B, 1]
        logits = torch.where(present[:, :, None, None], logits, NO_OBJECT_LOGIT).float()
        best = torch.argmax(ious, dim=-1) if multimask else torch.zeros(B, dtype=torch.long, device=ious.device)
        rows = torch.arange(B, device=ious.device)
        low_res = logits[rows, best].unsqueeze(1)
        token = tokens[rows, best] if multimask and tokens.shape[1] > 1 else tokens[:, 0]
        pointer = self._gate_pointer(self.obj_ptr_proj(token), present.float())
        return DecoderOutput(
            multimask_logits=logits,
            multimask_ious=ious,
            low_res_logits=low_res,
            high_res_logits=self.upsample_to_input(low_res),
            iou=ious[rows, best],
            object_pointer=pointer,
            presence_logit=presence,
        )

    def mask_as_output(
        self, image_embed: torch.Tensor, high_res_feats: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> DecoderOutput:
        """A mask prompt on a conditioning frame is its own output; only its pointer comes from the decoder."""
        mask = mask.float()  # [B, 1, S, S] binary
        high_res = mask * MASK_PROMPT_SCALE + MASK_PROMPT_BIAS
        low_res = F.interpolate(high_res, size=(mask.shape[-2] // 4, mask.shape[-1] // 4),
                                mode="bilinear", align_corners=False, antialias=True)
        pointer = self.decode(image_embed, high_res_feats, None, None, self.mask_downsample(mask), False).object_pointer
        present = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()  # [B, 1]
        presence = MASK_PROMPT_SCALE * present + MASK_PROMPT_BIAS
        # The decoder call above already gated the pointer by ITS presence head; the official model
        # gates it again by the mask's presence, and fixed_no_obj_ptr makes that a no-op when present.
        return DecoderOutput(
            multimask_logits=low_res,
            multimask_ious=torch.ones(mask.shape[0], 1, device=mask.device),
            low_res_logits=low_res,
            high_res_logits=high_res,
            iou=torch.ones(mask.shape[0], device=mask.device),
            object_pointer=self._gate_pointer(pointer, present),
            presence_logit=presence,
        )

    def _gate_pointer(self, pointer: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        # fixed_no_obj_ptr: an absent object's pointer is exactly the learned no_obj_ptr.
        return present * pointer + (1 - present) * self.no_obj_ptr

    def upsample_to_input(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        S = self.image_size
        return F.interpolate(low_res_logits, size=(S, S), mode="bilinear", align_corners=False)

    def encode_memory(
        self,
        image_embed: torch.Tensor,  # [B, C, h, w] raw (not memory-conditioned) features
        mask_logits: torch.Tensor,  # [B, 1, S, S]
        presence_logit: torch.Tensor,  # [B, 1]
        binarize: bool,
    ) -> torch.Tensor:
        """Spatial memory of one frame, [B, Cm, h, w] in bf16 (the official storage precision)."""
        c = self.config
        if binarize and c.binarize_mask_from_pts_for_mem_enc:
            mask = (mask_logits > 0).float()
        else:
            mask = torch.sigmoid(mask_logits)
        mask = mask * c.sigmoid_scale_for_mem_enc + c.sigmoid_bias_for_mem_enc
        memory = self.memory_encoder(image_embed, mask, skip_mask_sigmoid=True)["vision_features"]
        if self.no_obj_embed_spatial is not None:
            absent = 1.0 - (presence_logit > 0).float()  # [B, 1]
            memory = memory + absent[:, :, None, None] * self.no_obj_embed_spatial[:, :, None, None]
        return memory.to(torch.bfloat16)

    def condition_on_memory(
        self,
        image_embed: torch.Tensor,  # [1, C, h, w]
        memory: Optional[torch.Tensor],  # [M, 1, Cm] spatial memory tokens then object-pointer tokens
        memory_pos: Optional[torch.Tensor],  # [M, 1, Cm]
        num_pointer_tokens: int,
    ) -> torch.Tensor:
        """Memory attention; with no memory (a fresh prompt) the learned no-memory embedding is added instead."""
        B, C, h, w = image_embed.shape
        if memory is None:
            return image_embed + self.no_mem_embed.view(1, C, 1, 1)
        tokens = image_embed.flatten(2).permute(2, 0, 1)  # [h*w, B, C]
        out = self.memory_attention(
            curr=tokens, curr_pos=self.image_pos_embedding(h, w).expand(-1, B, -1),
            memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=num_pointer_tokens,
        )
        return out.permute(1, 2, 0).reshape(B, C, h, w)

    def pointer_time_encoding(self, offsets: torch.Tensor, max_offset: int) -> torch.Tensor:
        """Temporal encoding of object pointers, [N] frame offsets -> [N, Cm]."""
        if not self.config.add_tpos_enc_to_obj_ptrs:
            return torch.zeros(len(offsets), self.mem_dim, device=self.device)
        dim = self.hidden_dim if self.config.proj_tpos_enc_in_obj_ptrs else self.mem_dim
        return self.obj_ptr_tpos_proj(sine_embedding_1d(offsets.float() / max(max_offset, 1), dim=dim))

    # ---- entry points --------------------------------------------------------------------------
    def new_tracker(
        self, video_size: tuple[int, int], num_frames: Optional[int] = None, *, reverse: bool = False
    ) -> "ObjectTracker":
        """A tracker for one object of one video/stream. `num_frames` is the known length of a file."""
        from .tracker import ObjectTracker

        return ObjectTracker(self, video_size=video_size, num_frames=num_frames, reverse=reverse)

    def restore_tracker(self, state: dict) -> "ObjectTracker":
        """A tracker resumed from `tracker.state_dict()` (same model name and image size)."""
        from .tracker import ObjectTracker

        return ObjectTracker.from_state(self, state)

    def step_many(self, requests: Sequence["StepRequest"]) -> list[MaskResult]:
        """Step trackers of this model together (see batched_step.step_many); results in request order."""
        from .batched_step import StepRequestError, step_many

        for i, r in enumerate(requests):
            if r.tracker.model is not self:
                raise StepRequestError(f"request {i}: its tracker belongs to another model", i)
        return step_many(requests)

    def forward(self, *args, **kwargs):
        raise RuntimeError("use model.encode(frames) and model.new_tracker(...).step(...)")
