"""A tiny random feature extractor registered with torch-fidelity (no Inception weights can be downloaded in CI):
the library's own extractor mechanism and metric code run; the numbers mean nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "tiny-random-test"


class TinyFeatures(FeatureExtractorBase):
    """uint8 [B, 3, H, W] -> '32' (pooled conv features: FID, precision/recall) and 'logits' (10-way: IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        gen = torch.Generator().manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, stride=2), nn.Conv2d(16, 32, 3, stride=2)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if feature_extractor_weights_path is not None:
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return ("32", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "32", "kid": "32", "prc": "32"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, x.shape)
        h = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        h = F.relu(self.conv2(F.relu(self.conv1(h)))).mean(dim=(2, 3))
        out = {"32": h, "logits": self.fc(h)}
        return tuple(out[name] for name in self.features_list)


def register() -> str:
    """Register once per process; returns the name to pass as --feature-extractor."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, TinyFeatures)
    return NAME
