"""Streaming per-object tracker: one object of one video, stepped frame by frame.

Semantics follow the official SAM2VideoPredictor so outputs match it numerically:
  * `step(k, emb, prompt)` on a frame the tracker has not seen makes k a conditioning frame computed
    WITHOUT memory, exactly like the official "add a prompt at k, propagate from k".
  * `step(k, emb)` tracks: memory attention over conditioning frames, the previous `num_maskmem-1`
    spatial memories and up to `max_obj_ptrs_in_encoder-1` previous object pointers.
  * `refine(emb, prompt)` corrects the most recently stepped frame: clicks plus the previous mask
    logits as mask input, with memory, and the frame becomes a conditioning frame (the official
    predictor built with add_all_frames_to_correct_as_cond=True, as in the SAM 2 web demo).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from .batched_step import MemoryInputs, TrackingItem, track_group
from .memory_bank import MemoryBank, MemoryEntry
from .postprocess import fill_holes
from .types import FrameEmbedding, MaskResult, Prompt

STATE_VERSION = 1
PREV_LOGITS_CLAMP = 32.0  # the official predictor clamps previous logits fed back as mask input


class ObjectTracker:
    def __init__(
        self,
        model,
        video_size: tuple[int, int],
        num_frames: Optional[int] = None,
        *,
        reverse: bool = False,
        bank: Optional[MemoryBank] = None,
    ) -> None:
        h, w = int(video_size[0]), int(video_size[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"video_size must be positive (H, W), got {video_size}")
        if num_frames is not None and num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        c = model.config
        self.model = model
        self.video_size = (h, w)
        self.num_frames = num_frames
        self.reverse = reverse
        self.bank = bank or MemoryBank(
            num_spatial=c.num_maskmem - 1,
            num_pointers=c.max_obj_ptrs_in_encoder - 1,
            max_conditioning=c.max_cond_frames_in_memory,
        )
        self.last_frame_idx: Optional[int] = None
        self.last_low_res: Optional[torch.Tensor] = None  # [1, 1, S/4, S/4] of last_frame_idx
        # Non-conditioning entries right after the first prompt, newest-last, kept so a reverse pass
        # (bidirectional offline tracking) sees the same neighbours the official predictor does.
        self.first_prompt_frame: Optional[int] = None
        self.reverse_seed: OrderedDict[int, MemoryEntry] = OrderedDict()

    # ---- public API ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, frame_idx: int, embedding: FrameEmbedding, prompt: Optional[Prompt] = None) -> MaskResult:
        frame_idx = int(frame_idx)
        self.check_step(frame_idx, embedding, prompt)
        emb = embedding.to(self.model.device)
        with self.model.compute_context():
            if prompt is not None:
                result = self._run_prompted(frame_idx, emb, prompt, fresh=True, prev_logits=None)
            else:
                result = track_group(self.model, [TrackingItem(self, frame_idx, emb)])[0]
        return result

    def check_step(self, frame_idx: int, embedding: FrameEmbedding, prompt: Optional[Prompt]) -> None:
        """Every check `step` makes before touching any state; raises ValueError."""
        self._check_order(frame_idx)
        if prompt is None and not self.bank.has_conditioning:
            raise ValueError(f"frame {frame_idx}: this object has no prompt yet; give one with its first step")
        if embedding.image_size != self.model.image_size:
            raise ValueError(f"embedding is for image size {embedding.image_size}, model uses {self.model.image_size}")
        if prompt is not None:
            prompt.check_inside(self.video_size)

    @torch.inference_mode()
    def refine(self, embedding: FrameEmbedding, prompt: Prompt) -> MaskResult:
        """Correct the most recently stepped frame. `prompt` holds all clicks wanted on that frame."""
        if self.last_frame_idx is None:
            raise ValueError("refine() needs a frame that was already stepped")
        if embedding.image_size != self.model.image_size:
            raise ValueError(f"embedding is for image size {embedding.image_size}, model uses {self.model.image_size}")
        prompt.check_inside(self.video_size)
        prev = None
        if prompt.mask is None:
            prev = self.last_low_res.clamp(-PREV_LOGITS_CLAMP, PREV_LOGITS_CLAMP)
        emb = embedding.to(self.model.device)
        with self.model.compute_context():
            return self._run_prompted(self.last_frame_idx, emb, prompt, fresh=False, prev_logits=prev)

    def reverse_tracker(self) -> "ObjectTracker":
        """A tracker that continues backwards from the first prompted frame k: step k-1, k-2, ..., 0."""
        if self.first_prompt_frame is None:
            raise ValueError("reverse_tracker() needs an object that has been prompted")
        bank = MemoryBank(self.bank.num_spatial, self.bank.num_pointers, self.bank.max_conditioning)
        bank.conditioning = OrderedDict(self.bank.conditioning)
        # Farthest first, so the nearest neighbours are evicted last and keep their spatial memory.
        for frame_idx in sorted(self.reverse_seed, reverse=True):
            bank.add_recent(self.reverse_seed[frame_idx])
        rt = ObjectTracker(self.model, self.video_size, self.num_frames, reverse=True, bank=bank)
        rt.last_frame_idx = self.first_prompt_frame
        rt.first_prompt_frame = self.first_prompt_frame
        return rt

    def memory_bytes(self) -> int:
        seed = sum(t.numel() * t.element_size() for e in self.reverse_seed.values() for t in e.tensors())
        return self.bank.nbytes() + seed

    # ---- one frame -----------------------------------------------------------------------------
    def _run_prompted(
        self, frame_idx: int, emb: FrameEmbedding, prompt: Prompt, *, fresh: bool, prev_logits
    ) -> MaskResult:
        model = self.model
        image_embed, high_res = emb.image_embed[None], [f[None] for f in emb.high_res_feats]
        if prompt.mask is not None:
            dec = model.mask_as_output(image_embed, high_res, self._mask_to_input(prompt.mask))
        else:
            coords, labels = model.prompt_points(prompt, self.video_size)
            conditioned = self._conditioned_features(frame_idx, image_embed, fresh=fresh)
            dec = model.decode(conditioned, high_res, coords, labels, prev_logits, multimask=coords.shape[1] <= 1)
        low_res = self._fill_holes(dec.low_res_logits)
        # Prompted frames get their memory from the stored low-res mask, binarised (the official
        # predictor encodes them this way when propagation starts).
        memory = model.encode_memory(image_embed, model.upsample_to_input(low_res), dec.presence_logit, binarize=True)
        self.bank.add_conditioning(
            MemoryEntry(frame_idx, memory, dec.object_pointer, dec.presence_logit, low_res_logits=low_res)
        )
        self.reverse_seed.pop(frame_idx, None)
        if fresh and self.first_prompt_frame is None:
            self.first_prompt_frame = frame_idx
        self.last_frame_idx = frame_idx
        return self._result(frame_idx, low_res, dec.presence_logit, dec.iou, is_conditioning=True)

    def commit_tracking(
        self,
        frame_idx: int,
        memory: torch.Tensor,  # bf16 [1, Cm, h, w]
        object_pointer: torch.Tensor,  # [1, C]
        presence_logit: torch.Tensor,  # [1, 1]
        low_res: torch.Tensor,  # [1, 1, S/4, S/4] (holes not yet filled)
        iou: torch.Tensor,  # [1]
    ) -> MaskResult:
        """Second half of a tracking step (the first is `memory_inputs`): store this frame's memory."""
        entry = MemoryEntry(frame_idx, memory, object_pointer, presence_logit)
        self.bank.add_recent(entry)
        self._remember_for_reverse(entry)
        self.last_frame_idx = frame_idx
        return self._result(frame_idx, self._fill_holes(low_res), presence_logit, iou, is_conditioning=False)

    def _conditioned_features(self, frame_idx: int, image_embed: torch.Tensor, *, fresh: bool) -> torch.Tensor:
        """Memory attention output for one frame; a fresh prompt uses no memory at all."""
        if fresh:
            return self.model.condition_on_memory(image_embed, None, None, 0)
        inputs = self.memory_inputs(frame_idx)
        return self.model.condition_on_memory(image_embed, inputs.tokens, inputs.positions, inputs.num_pointer_tokens)

    def memory_inputs(self, frame_idx: int) -> MemoryInputs:
        """What memory attention reads for `frame_idx`, assembled from the bank (one object, batch 1)."""
        model, c = self.model, self.model.config
        h = w = model.image_size // 16
        direction = -1 if self.reverse else 1
        memory_pos = model.memory_pos_embedding(h, w)  # [h*w, 1, Cm]
        tokens, positions = [], []

        def add_spatial(entry: MemoryEntry, t_pos: int) -> None:
            tokens.append(entry.memory.float().flatten(2).permute(2, 0, 1))  # [h*w, 1, Cm]
            positions.append(memory_pos + model.maskmem_tpos_enc[c.num_maskmem - t_pos - 1])

        for entry in self.bank.conditioning.values():
            add_spatial(entry, t_pos=0)
        for t_pos in range(1, c.num_maskmem):  # oldest first, as the official predictor orders them
            entry = self.bank.spatial_memory_at(frame_idx - direction * (c.num_maskmem - t_pos))
            if entry is not None:
                add_spatial(entry, t_pos)

        max_pointers = c.max_obj_ptrs_in_encoder if self.num_frames is None else min(self.num_frames, c.max_obj_ptrs_in_encoder)
        offsets, pointers = [], []
        for t, entry in self.bank.conditioning.items():
            if (t >= frame_idx) if self.reverse else (t <= frame_idx):  # only pointers from the past
                offsets.append((frame_idx - t) * direction if c.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t))
                pointers.append(entry.object_pointer)
        for t_diff in range(1, max_pointers):
            t = frame_idx - direction * t_diff
            if t < 0 or (self.num_frames is not None and t >= self.num_frames):
                break
            entry = self.bank.pointer_at(t)
            if entry is not None:
                offsets.append(t_diff)
                pointers.append(entry.object_pointer)
        num_pointer_tokens = 0
        if pointers:
            ptrs = torch.stack(pointers, dim=0)  # [N, 1, C]
            time_enc = model.pointer_time_encoding(torch.tensor(offsets, device=ptrs.device), max_pointers - 1)
            time_enc = time_enc.unsqueeze(1)  # [N, 1, Cm]
            split = model.hidden_dim // model.mem_dim  # each C-wide pointer becomes `split` Cm-wide tokens
            ptrs = ptrs.reshape(-1, 1, split, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            tokens.append(ptrs)
            positions.append(time_enc.repeat_interleave(split, dim=0))
            num_pointer_tokens = ptrs.shape[0]
        return MemoryInputs(torch.cat(tokens, dim=0), torch.cat(positions, dim=0), num_pointer_tokens)

    # ---- helpers -------------------------------------------------------------------------------
    def _check_order(self, frame_idx: int) -> None:
        if frame_idx < 0:
            raise ValueError(f"frame_idx must be >= 0, got {frame_idx}")
        if self.num_frames is not None and frame_idx >= self.num_frames:
            raise ValueError(f"frame_idx {frame_idx} is past the video's {self.num_frames} frames")
        last = self.last_frame_idx
        if last is not None and ((frame_idx >= last) if self.reverse else (frame_idx <= last)):
            order = "decreasing" if self.reverse else "increasing"
            raise ValueError(f"frames must be stepped in {order} order: got {frame_idx} after {last}")

    def _mask_to_input(self, mask) -> torch.Tensor:
        S = self.model.image_size
        m = torch.as_tensor(mask, dtype=torch.float32, device=self.model.device)[None, None]
        if tuple(m.shape[-2:]) != (S, S):
            m = F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        return m

    def _fill_holes(self, low_res: torch.Tensor) -> torch.Tensor:
        area = self.model.config.fill_hole_area
        return fill_holes(low_res, area) if area > 0 else low_res

    def _remember_for_reverse(self, entry: MemoryEntry) -> None:
        k = self.first_prompt_frame
        if self.reverse or k is None:
            return
        distance = entry.frame_idx - k
        if 0 < distance <= self.bank.num_pointers:
            self.reverse_seed[entry.frame_idx] = entry if distance <= self.bank.num_spatial else entry.without_memory()

    def _result(self, frame_idx: int, low_res: torch.Tensor, presence_logit: torch.Tensor, iou: torch.Tensor,
                *, is_conditioning: bool) -> MaskResult:
        self.last_low_res = low_res
        return MaskResult(
            frame_idx=frame_idx,
            low_res_logits=low_res[0],
            score=float(presence_logit.reshape(-1)[0]),
            iou=float(iou.reshape(-1)[0]),
            video_size=self.video_size,
            is_conditioning=is_conditioning,
        )

    # ---- serialisation -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors/ints/lists only, so `torch.load(weights_only=True)` can read a snapshot back."""
        seed_bank = MemoryBank(self.bank.num_spatial, self.bank.num_pointers, self.bank.max_conditioning)
        seed_bank.recent = OrderedDict(self.reverse_seed)
        return {
            "version": STATE_VERSION,
            "model": self.model.config.name,
            "image_size": self.model.image_size,
            "video_size": list(self.video_size),
            "num_frames": self.num_frames,
            "reverse": self.reverse,
            "last_frame_idx": self.last_frame_idx,
            "last_low_res": self.last_low_res,
            "first_prompt_frame": self.first_prompt_frame,
            "bank": self.bank.state_dict(),
            "reverse_seed": seed_bank.state_dict()["recent"],
        }

    @classmethod
    def from_state(cls, model, state: dict) -> "ObjectTracker":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported tracker state version {state.get('version')!r}")
        if state["model"] != model.config.name or state["image_size"] != model.image_size:
            raise ValueError(
                f"tracker state is for {state['model']} at {state['image_size']} px, "
                f"model is {model.config.name} at {model.image_size} px"
            )
        tracker = cls(model, tuple(state["video_size"]), state["num_frames"], reverse=state["reverse"],
                      bank=MemoryBank.from_state(state["bank"]))
        tracker.last_frame_idx = state["last_frame_idx"]
        tracker.last_low_res = state["last_low_res"]
        tracker.first_prompt_frame = state["first_prompt_frame"]
        tracker.reverse_seed = OrderedDict((e["frame_idx"], MemoryEntry(**e)) for e in state["reverse_seed"])
        return tracker
