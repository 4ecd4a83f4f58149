"""LlamaGen's VQ image decoder (decode only): codebook ids -> RGB pixels, from the official checkpoint.

    vq = VQDecoder.from_checkpoint("vq_ds16_c2i.pt")          # official VQ-16 config by default
    images = vq.decode_codes(tokens, grid=16)                   # int64 [B, 256] -> uint8 [B, 256, 256, 3]

Same equations and state-dict names as FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py
(`VQModel.decode_code`): codebook lookup (rows l2-normalised when `codebook_l2_norm`, the official default),
post_quant_conv, Decoder; pixels post-processed like the official samplers (clamp to [-1, 1], (x + 1) / 2 * 255,
rounded). The checkpoint is `{"model": state_dict}`; encoder / quant_conv / usage-buffer keys of a full
checkpoint are ignored, since decoding never reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adsa_vllm.vq.blocks import Decoder

# Parts of a full VQModel checkpoint that decoding does not use.
UNUSED_PREFIXES = ("encoder.", "quant_conv.", "quantize.codebook_used")


class VQCheckpointError(ValueError):
    """The checkpoint does not fit the decoder config; the message names the keys and the fix."""


@dataclass(frozen=True)
class VQConfig:
    """Official `VQ_16` defaults (vq_ds16_c2i.pt / vq_ds16_t2i.pt)."""
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))  # a JSON list is fine too

    @property
    def downsample(self) -> int:
        """Pixels per token along one side (16 for VQ-16)."""
        return 2 ** (len(self.ch_mult) - 1)


class Codebook(nn.Module):
    """The `quantize` part used for decoding: `embedding` [codebook_size, embed_dim]."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        self.l2_norm = config.codebook_l2_norm

    def lookup(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """int [B, grid*grid] (raster order) -> z_q [B, embed_dim, grid, grid]."""
        table = F.normalize(self.embedding.weight, p=2, dim=-1) if self.l2_norm else self.embedding.weight
        return table[codes].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2).contiguous()


class VQDecoder(nn.Module):
    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        self.config = config
        self.quantize = Codebook(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config.z_channels, config.ch, config.ch_mult, config.num_res_blocks, config.dropout)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **config) -> "VQDecoder":
        """Load an official VQ checkpoint ({"model": state_dict}, .pt, or .safetensors); `config` overrides
        VQConfig's official VQ-16 defaults (e.g. codebook_size, ch_mult)."""
        from adsa_vllm.llamagen.convert import ConversionError, load_checkpoint
        try:
            sd = load_checkpoint(path)
        except ConversionError as e:
            raise VQCheckpointError(f"{path}: {e}") from None
        model = cls(VQConfig(**config))
        model.load_decoder_state(sd, source=str(path))
        return model.eval()

    def load_decoder_state(self, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strictly load the decoding keys of `sd`, ignoring UNUSED_PREFIXES; errors name every offending key."""
        own = self.state_dict()
        used = {k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES)}
        missing = _ordered(set(own) - set(used))
        unexpected = _ordered(set(used) - set(own))
        wrong = [f"{k}: checkpoint {list(used[k].shape)}, config {list(own[k].shape)}"
                 for k in _ordered(set(own) & set(used)) if used[k].shape != own[k].shape]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es): {_some(wrong)}")
        if problems:
            raise VQCheckpointError(
                f"{source} is not a LlamaGen VQ decoder checkpoint for {asdict(self.config)}: " + "; ".join(problems)
                + ". Expected the official vq_model.py layout ({'model': state_dict} with quantize.embedding.weight, "
                "post_quant_conv.*, decoder.*); for another VQ size pass its config (codebook_size, "
                "codebook_embed_dim, z_channels, ch, ch_mult, num_res_blocks).")
        self.load_state_dict({k: used[k].to(own[k].dtype) for k in own}, strict=True)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """int64 [B, grid*grid] -> float [B, 3, H, W], about [-1, 1] (the official `decode_code`)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes, grid)))

    def decode_codes(self, tokens, grid: int) -> np.ndarray:
        """Codebook ids [B, grid*grid] (numpy, list or tensor; raster order) -> uint8 RGB [B, H, W, 3]."""
        device = self.post_quant_conv.weight.device
        codes = torch.as_tensor(np.asarray(tokens), dtype=torch.int64, device=device).reshape(-1, grid * grid)
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.config.codebook_size:
            raise ValueError(f"codebook ids must be in 0..{self.config.codebook_size - 1}, "
                             f"got {int(codes.min())}..{int(codes.max())}")
        x = self.decode(codes, grid).clamp(-1, 1)
        return torch.round((x + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _ordered(keys) -> list[str]:
    """Codebook and post_quant_conv first: their shapes name the config fields most directly."""
    return sorted(keys, key=lambda k: (k.startswith("decoder."), k))


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


__all__ = ["UNUSED_PREFIXES", "VQCheckpointError", "VQConfig", "VQDecoder"]
