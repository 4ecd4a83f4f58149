"""FID, Inception Score and precision / recall of a sample batch against a reference batch, through the
torch-fidelity library (its feature extractors and metric functions), set up as ADM's evaluator computes them.

Why torch-fidelity (docs/eval.md has the comparison): its `inception-v3-compat` extractor is the TensorFlow FID
Inception graph ported to PyTorch, including TF1's bilinear resize to 299 px, so features match the TF numbers
that ADM's and LlamaGen's evaluator (TensorFlow) and the published tables use, and one library gives all three
metrics from the same features. As in ADM's evaluator:
  * FID: pool_3 features (`2048`); against the reference npz's stored mu / sigma when it has them (ADM's reference
    batches: the whole training set) and the default extractor is used, else against its arr_0 images;
  * IS: softmax of the unbiased logits (`logits_unbiased`, ADM's matmul without bias), over consecutive splits of
    5,000 samples, not shuffled (so the npz's order matters: adsa_vllm.eval.conditions cycles the classes);
  * precision / recall: pool_3 features (not torch-fidelity's VGG-16 default), k = 3 nearest neighbours.
A custom extractor registered with `torch_fidelity.register_feature_extractor` works too (--feature-extractor
NAME); its default layers per metric are used. Weights: `feature_extractor_weights_path`, else the library
downloads its own on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_FEATURE_EXTRACTOR = "inception-v3-compat"
IS_SPLIT_SIZE = 5000          # ADM's compute_inception_score(split_size=5000)
PR_NEIGHBOURS = 3             # ADM's ManifoldEstimator(nhood_sizes=(3,))
METRICS = ("isc", "fid", "prc")
INSTALL = "pip install torch-fidelity==0.4.0 torchvision==0.26.0 (or: pip install -e '.[eval]')"


class MetricsUnavailable(RuntimeError):
    """torch-fidelity (or the named extractor) is not available; the message names the fix."""


def require_library() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise MetricsUnavailable(f"FID / IS / precision-recall need torch-fidelity ({e}): {INSTALL}") from None


class _ImageArray(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] as the torch Dataset torch-fidelity reads: uint8 [3, H, W] per item."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


@dataclass
class FeatureSpace:
    """A torch-fidelity feature extractor and the layer each metric reads, loaded once for a run."""
    name: str
    layers: dict            # metric ("isc", "fid", "prc") -> layer name
    extractor: object
    cuda: bool
    batch_size: int = 64
    verbose: bool = False

    @classmethod
    def create(cls, name: str = DEFAULT_FEATURE_EXTRACTOR, weights_path: str | None = None,
               device: str | None = None, batch_size: int = 64, verbose: bool = False) -> "FeatureSpace":
        require_library()
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise MetricsUnavailable(f"--feature-extractor {name!r} is not registered with torch-fidelity; "
                                     f"registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        layers = {m: resolve_feature_layer_for_metric(m, feature_extractor=name) for m in METRICS}
        extractor = create_feature_extractor(name, sorted(set(layers.values())), cuda=cuda, verbose=verbose,
                                             feature_extractor_weights_path=weights_path)
        return cls(name, layers, extractor, cuda, batch_size, verbose)

    def features(self, images: np.ndarray) -> dict:
        """uint8 [N, H, W, 3] -> {layer: float tensor [N, D]} (on the CPU)."""
        from torch_fidelity.utils import get_featuresdict_from_dataset
        # save_cpu_ram: no DataLoader worker processes (the images are in memory already)
        return get_featuresdict_from_dataset(_ImageArray(images), self.extractor, self.batch_size, self.cuda,
                                             save_cpu_ram=True, verbose=self.verbose)


@dataclass
class Scores:
    fid: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    fid_reference: str      # "npz mu/sigma" or "arr_0 (N images)"


def fid_statistics(features) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics
    stats = fid_features_to_statistics(features)
    return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}


def score(samples: dict, reference: dict, layers: dict, *, reference_stats: dict | None = None,
          device: str = "cpu") -> Scores:
    """Metrics of sample features against reference features ({layer: [N, D]}, FeatureSpace.features).
    reference_stats: {"mu", "sigma"} to compute FID against instead of the reference features."""
    from torch_fidelity import (KEY_METRIC_FID, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_PRECISION,
                                KEY_METRIC_RECALL)
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    n, n_ref = len(samples[layers["fid"]]), len(reference[layers["prc"]])
    if min(n, n_ref) < PR_NEIGHBOURS + 1:
        raise ValueError(f"precision / recall need at least {PR_NEIGHBOURS + 1} images on each side (k = "
                         f"{PR_NEIGHBOURS} neighbours); got {n} samples and {n_ref} reference images")
    isc = isc_features_to_metric(samples[layers["isc"]], splits=max(1, math.ceil(n / IS_SPLIT_SIZE)), shuffle=False)
    if reference_stats is not None:
        ref_stats = {k: np.asarray(reference_stats[k], dtype=np.float64) for k in ("mu", "sigma")}
        where = "npz mu/sigma"
    else:
        ref_stats, where = fid_statistics(reference[layers["fid"]]), f"arr_0 ({len(reference[layers['fid']])} images)"
    sample_stats = fid_statistics(samples[layers["fid"]])
    if sample_stats["mu"].shape != ref_stats["mu"].shape:
        raise ValueError(f"the reference statistics have {ref_stats['mu'].shape[0]} dimensions but the "
                         f"{layers['fid']!r} features {sample_stats['mu'].shape[0]}")
    fid = fid_statistics_to_metric(sample_stats, ref_stats, verbose=False)
    on = torch.device(device)
    prc = prc_features_to_metric(samples[layers["prc"]].to(on), reference[layers["prc"]].to(on),
                                 prc_neighborhood=PR_NEIGHBOURS, prc_batch_size=10000, save_cpu_ram=True,
                                 verbose=False)
    return Scores(fid=float(fid[KEY_METRIC_FID]), inception_score=float(isc[KEY_METRIC_ISC_MEAN]),
                  inception_score_std=float(isc[KEY_METRIC_ISC_STD]), precision=float(prc[KEY_METRIC_PRECISION]),
                  recall=float(prc[KEY_METRIC_RECALL]), fid_reference=where)


__all__ = ["DEFAULT_FEATURE_EXTRACTOR", "FeatureSpace", "INSTALL", "IS_SPLIT_SIZE", "METRICS", "MetricsUnavailable",
           "PR_NEIGHBOURS", "Scores", "fid_statistics", "require_library", "score"]
