"""LlamaGen VQ image decoder (decode only, plain torch): `VQDecoder.from_checkpoint("vq_ds16_c2i.pt")`."""

from adsa_vllm.vq.decoder import UNUSED_PREFIXES, VQCheckpointError, VQConfig, VQDecoder

__all__ = ["UNUSED_PREFIXES", "VQCheckpointError", "VQConfig", "VQDecoder"]
