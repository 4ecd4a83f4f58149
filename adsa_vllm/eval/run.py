"""One eval run: sample every setting through one `vllm.LLM` (resumably), then score each npz against the
reference batch and write the table. `adsa-vllm eval` (command.py) builds an EvalRun from its flags."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from adsa_vllm.eval.conditions import Conditions
from adsa_vllm.eval.report import Row, write_report
from adsa_vllm.eval.samples import SampleFile, SamplePlan, finished_samples, sample_setting
from adsa_vllm.eval.setting import Setting


@dataclass
class EvalRun:
    model_dir: str
    config: object                       # LlamaGenConfig
    conditions: Conditions
    settings: list[Setting]
    plan: SamplePlan
    out_dir: Path
    dtype: str = "float32"
    vq: object = None                    # VQDecoder or None
    vq_path: str | None = None
    eval_size: int | None = None         # resize VQ images to this side (LlamaGen's --image-size-eval)
    engine_args: dict = field(default_factory=dict)   # more vllm.LLM keyword arguments (max_num_seqs, ...)
    reference: Path | None = None        # reference batch npz (checked already); None: sampling only
    feature_extractor: str = "inception-v3-compat"
    feature_weights: str | None = None
    metrics_device: str | None = None
    metrics_batch_size: int = 64
    progress: bool = True


def _sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """config.json, and the weights' size, first and last MiB: cheap, and different for any other checkpoint."""
    d = Path(model_dir)
    chunks = [(d / "config.json").read_bytes()]
    weights = d / "model.safetensors"
    if weights.is_file():
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            chunks += [str(size).encode(), head, f.read()]
    return _sha256(*chunks)


def conditions_fingerprint(conditions: Conditions) -> str:
    import torch
    chunks = []
    for p in conditions.prompts:
        if "prompt_embeds" in p:
            chunks.append(p["prompt_embeds"].to(torch.float32).contiguous().numpy().tobytes())
        else:
            chunks.append(json.dumps(p["prompt_token_ids"]).encode())
    return _sha256(*chunks)


def identity(run: EvalRun, setting: Setting) -> dict:
    """Everything that makes a setting's samples what they are (compared when a run resumes)."""
    return {"setting": setting.label, "model": str(Path(run.model_dir).resolve()),
            "model_fingerprint": model_fingerprint(run.model_dir), "kind": run.conditions.kind,
            "conditions": len(run.conditions), "conditions_fingerprint": conditions_fingerprint(run.conditions),
            **asdict(run.plan), "dtype": run.dtype, "vq": run.vq_path, "image_size_eval": run.eval_size}


def engine_kwargs(run: EvalRun) -> dict:
    """vllm.LLM's arguments for every setting of the run: ADSA backend, guidance on when cfg != 1. Each request
    names its whole setting; the engine default matters only for a query-dependent policy (attention_mass), which
    vLLM runs per request only where the engine's default is one (its CUDA graphs then save the decode query:
    adsa_vllm/worker/saved_queries.py)."""
    import torch

    from adsa_vllm.cli_common import BLOCK_SIZE
    from adsa_vllm.config import ADSAConfig
    from adsa_vllm.policy import needs_query
    default = {"budget": None}
    for s in run.settings:
        if not s.is_full and needs_query(ADSAConfig.from_dict(s.request_adsa())):
            default = {"budget": None, "policy": s.policy, "granularity": s.granularity}
    additional = {"adsa": default}
    if run.plan.cfg_scale != 1.0:
        additional["cfg"] = {"scale": run.plan.cfg_scale}
    kwargs = dict(model=run.model_dir, attention_backend="adsa", additional_config=additional, dtype=run.dtype,
                  block_size=BLOCK_SIZE, seed=0, enforce_eager=not torch.cuda.is_available())
    return {**kwargs, **run.engine_args}


def build_engine(run: EvalRun):
    from vllm import LLM
    return LLM(**engine_kwargs(run))


def sample_all(run: EvalRun) -> list[SampleFile]:
    """Every setting's npz, sampling only what is not on disk yet (the engine starts only if something is)."""
    from tqdm.auto import tqdm

    from adsa_vllm.eval.pixels import eval_images
    ids = [identity(run, s) for s in run.settings]
    pending = [s for s, i in zip(run.settings, ids) if finished_samples(run.out_dir, s, i) is None]
    llm = None
    if pending:
        llm = build_engine(run)
        if run.vq is not None:   # after the engine: CUDA first touched here, not before vLLM starts its workers
            import torch
            run.vq.to("cuda" if torch.cuda.is_available() else "cpu")

    def decode(tokens):
        return eval_images(run.config, tokens, vq=run.vq, eval_size=run.eval_size)

    files = []
    with tqdm(total=run.plan.total * len(run.settings), unit="img", desc="sampling", position=0,
              disable=not run.progress) as bar:
        for s, i in zip(run.settings, ids):
            files.append(sample_setting(llm, run.conditions, run.plan, s, run.out_dir, decode=decode,
                                        image_tokens=run.config.image_tokens, identity=i,
                                        progress=bar if run.progress else None))
    if llm is not None:   # free the engine's memory (GPU: the KV cache) before the feature extractor runs
        del llm
        gc.collect()
    return files


def measure(run: EvalRun, files: list[SampleFile]) -> list:
    """Scores of each npz against the reference batch (reference features computed once)."""
    import torch

    from adsa_vllm.eval.metrics import DEFAULT_FEATURE_EXTRACTOR, FeatureSpace, score
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from adsa_vllm.eval.reference import load_reference_batch
    space = FeatureSpace.create(run.feature_extractor, run.feature_weights, run.metrics_device,
                                run.metrics_batch_size, verbose=run.progress)
    ref = load_reference_batch(run.reference)   # read again here: not held in memory while sampling
    ref_features = space.features(ref.images)
    stored = ({"mu": ref.mu, "sigma": ref.sigma}
              if ref.mu is not None and run.feature_extractor == DEFAULT_FEATURE_EXTRACTOR else None)
    device = "cuda" if space.cuda else "cpu"
    out = []
    for f in files:
        with np.load(f.path) as z:
            images = z["arr_0"]
        out.append(score(space.features(images), ref_features, space.layers, reference_stats=stored,
                         device=device))
    return out


def describe(run: EvalRun) -> dict:
    """The report's header: what was sampled and how it was scored."""
    import torch
    import vllm
    p = run.plan
    info = {"model": run.model_dir, "kind": run.conditions.kind,
            "conditions": f"{len(run.conditions)} x {p.per_condition} images",
            "sampling": f"cfg {p.cfg_scale:g}, temperature {p.temperature:g}, top-k {p.top_k}, top-p {p.top_p:g}, "
                        f"seed {p.seed} (image i: seed + i)",
            "dtype": run.dtype, "vq": run.vq_path or "none", "image size eval": run.eval_size or "as decoded",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "vllm": vllm.__version__,
            "seconds": "vLLM generate time of the samples (engine start, a warm-up image and decoding excluded)"}
    if run.reference is not None:
        import torch_fidelity
        info.update({"reference": str(run.reference), "feature extractor": run.feature_extractor
                     + (f" ({run.feature_weights})" if run.feature_weights else ""),
                     "torch-fidelity": torch_fidelity.__version__})
    return info


def execute(run: EvalRun) -> tuple[list[Row], tuple[Path, Path]]:
    """Sample, score, write <out>/eval.json and eval.md; returns the rows and the two paths."""
    t0 = time.perf_counter()
    files = sample_all(run)
    scores = measure(run, files) if run.reference is not None else [None] * len(files)
    rows = []
    for s, f, sc in zip(run.settings, files, scores):
        row = Row(setting=s.label, images=f.images, seconds=f.seconds, samples=str(f.path))
        if sc is not None:
            row.fid, row.inception_score, row.inception_score_std = sc.fid, sc.inception_score, sc.inception_score_std
            row.precision, row.recall, row.fid_reference = sc.precision, sc.recall, sc.fid_reference
        rows.append(row)
    info = describe(run)
    if rows and rows[0].fid_reference:
        info["FID against"] = rows[0].fid_reference
    info["wall seconds (this invocation)"] = round(time.perf_counter() - t0, 1)
    return rows, write_report(rows, info, run.out_dir)


__all__ = ["EvalRun", "build_engine", "conditions_fingerprint", "describe", "engine_kwargs", "execute", "identity",
           "measure", "model_fingerprint", "sample_all"]
