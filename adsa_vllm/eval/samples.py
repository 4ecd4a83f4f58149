"""Sampling one setting's images through `vllm.LLM` into the npz that ADM's and LlamaGen's evaluators read,
resumably.

Files under the output folder, per setting (stem = Setting.file_stem, e.g. adsa_topk_v_0.5):
  <stem>.npz          arr_0: uint8 [N, H, W, 3] (NHWC, RGB), arr_1: int64 [N] labels (class id, or caption line):
                      the layout of ADM's sample batches (guided-diffusion image_sample.py); tokens: int32
                      [N, grid*grid] image tokens (decode again without sampling); evaluators read arr_0 only
  <stem>.json         what the samples are (model, setting, sampling, conditions: `identity`), and once complete
                      the image count and the sampling seconds
  <stem>.parts/       shards while sampling: NNNNN.npz per `shard_size` images, written atomically; removed once
                      <stem>.npz is assembled

Image i has condition i % len(conditions) and vLLM seed `seed + i`: its random draws do not depend on the shard or
batch it runs in (vLLM gives each seeded request its own generator). A rerun keeps every shard already on disk and
samples only the missing ones; a finished folder is left as it is. A resumed run equals an uninterrupted one as
far as the engine's logits do not depend on batch composition: exactly on CPU in float32 (tests/test_eval.py); in
bf16 on a GPU a batch-dependent kernel may flip a rare near-tie. A rerun whose identity differs (another seed,
model, CFG, ...) stops with the difference named instead of mixing samples.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class SamplePlan:
    """What one setting's samples are, LlamaGen's sample_c2i knobs included (top_k 0 = the whole codebook)."""
    num_conditions: int
    per_condition: int
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    shard_size: int = 1000

    def __post_init__(self):
        if self.per_condition < 1 or self.num_conditions < 1 or self.shard_size < 1:
            raise ValueError("images per condition, conditions and the shard size must be >= 1")

    @property
    def total(self) -> int:
        return self.num_conditions * self.per_condition

    def shards(self) -> list[range]:
        """Image indices of each shard, in order."""
        return [range(a, min(a + self.shard_size, self.total)) for a in range(0, self.total, self.shard_size)]


@dataclass
class SampleFile:
    """A setting's assembled samples."""
    path: Path
    images: int
    seconds: float          # vLLM generate time summed over the shards (engine start, one untimed warm-up image
                            # per setting and run, and decoding excluded)
    resumed_shards: int     # shards found on disk instead of sampled in this run


def _write_atomically(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _check_identity(meta_path: Path, identity: dict) -> dict | None:
    """The sidecar's content if it describes these samples; ValueError naming what differs if another run's."""
    meta = _read_json(meta_path)
    if meta is None or meta.get("identity") == identity:
        return meta
    old = meta.get("identity", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff)
    stem = meta_path.with_suffix("")
    raise ValueError(f"{meta_path} describes other samples ({shown}): give another --out, or delete "
                     f"{stem}.npz, {stem}.json and {stem}.parts/ to sample again")


def _read_shard(path: Path, indices: range, keys: tuple = ()) -> dict | None:
    """`keys` (plus labels and seconds) of a complete shard for these indices, or None (missing, cut short or
    unreadable: it is sampled again)."""
    try:
        with np.load(path) as z:
            shard = {k: z[k] for k in ("first", "labels", "seconds", *keys)}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    ok = int(shard["first"]) == indices.start and len(shard["labels"]) == len(indices)
    return shard if ok else None


def finished_samples(out_dir: str | Path, setting, identity: dict) -> SampleFile | None:
    """The setting's complete npz if an earlier run wrote it with this identity; None if there is none yet;
    ValueError naming the difference if the folder holds another run's samples."""
    out_dir = Path(out_dir)
    npz_path, meta_path = out_dir / f"{setting.file_stem}.npz", out_dir / f"{setting.file_stem}.json"
    meta = _check_identity(meta_path, identity)
    if meta is None or not meta.get("complete") or not npz_path.is_file():
        return None
    return SampleFile(npz_path, meta["images"], meta["sampling_seconds"], meta["shards"])


def sample_shard(llm, conditions, plan: SamplePlan, setting, indices: range, *, image_tokens: int,
                 use_tqdm=False) -> tuple[np.ndarray, float]:
    """Image tokens [len(indices), image_tokens] of the images `indices`, and the seconds vllm.LLM.generate took."""
    from vllm import SamplingParams
    extra = {"adsa": setting.request_adsa()}
    if plan.cfg_scale != 1.0:
        extra["cfg"] = {"scale": plan.cfg_scale}
    prompts = [conditions.prompts[conditions.of_image(i)] for i in indices]
    params = [SamplingParams(max_tokens=image_tokens, temperature=plan.temperature, top_k=plan.top_k,
                             top_p=plan.top_p, seed=plan.seed + i, detokenize=False, extra_args=extra)
              for i in indices]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    short = [(i, o.outputs[0].finish_reason) for i, o, t in zip(indices, outputs, tokens) if len(t) != image_tokens]
    if short:
        raise RuntimeError(f"images {[i for i, _ in short[:5]]} came back with fewer than {image_tokens} tokens "
                           f"(finish reason {short[0][1]!r}): the engine stopped them early")
    return np.asarray(tokens, dtype=np.int32), seconds


def sample_setting(llm, conditions, plan: SamplePlan, setting, out_dir: str | Path, *, decode: Callable,
                   image_tokens: int, identity: dict, progress=None) -> SampleFile:
    """Sample (or resume) one setting into <out_dir>/<stem>.npz; see the module docstring.

    llm: a vllm.LLM (None is fine when every shard is on disk); decode: tokens -> uint8 [B, H, W, 3];
    identity: JSON-able description of everything that makes these samples (compared on resume);
    progress: a tqdm over all images of the run, advanced per shard."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = setting.file_stem
    npz_path, meta_path, parts = out_dir / f"{stem}.npz", out_dir / f"{stem}.json", out_dir / f"{stem}.parts"
    done = finished_samples(out_dir, setting, identity)
    if done is not None:
        if progress is not None:
            progress.update(plan.total)
        return done
    _write_atomically(meta_path, lambda f: f.write(json.dumps({"identity": identity}, indent=1).encode()))
    parts.mkdir(exist_ok=True)
    shards = plan.shards()
    seconds, resumed, warm = 0.0, 0, False
    for k, indices in enumerate(shards):   # pass 1: every shard on disk, one shard in memory at a time
        path = parts / f"{k:05d}.npz"
        shard = _read_shard(path, indices)
        if shard is None:
            if llm is None:
                raise RuntimeError(f"{path} is missing and no engine was given to sample it")
            if not warm:   # one untimed image first: first-use costs (kernel JIT, memory) stay out of `seconds`
                sample_shard(llm, conditions, plan, setting, range(1), image_tokens=image_tokens)
                warm = True
            bar = _inner_bar(f"{setting.label} shard {k + 1}/{len(shards)}") if progress is not None else False
            tokens, took = sample_shard(llm, conditions, plan, setting, indices, image_tokens=image_tokens,
                                        use_tqdm=bar)
            labels = np.asarray([conditions.labels[conditions.of_image(i)] for i in indices], dtype=np.int64)
            shard = dict(images=decode(tokens), tokens=tokens, labels=labels, first=np.int64(indices.start),
                         seconds=np.float64(took))
            _write_atomically(path, lambda f: np.savez(f, **shard))
        else:
            resumed += 1
        seconds += float(shard["seconds"])
        if progress is not None:
            progress.update(len(indices))
    # pass 2: arrays of the final size, filled shard by shard (peak memory: the samples once, plus a shard)
    images = tokens = None
    labels = np.empty(plan.total, dtype=np.int64)
    for k, indices in enumerate(shards):
        shard = _read_shard(parts / f"{k:05d}.npz", indices, ("images", "tokens"))
        if shard is None:
            raise RuntimeError(f"{parts / f'{k:05d}.npz'} changed while assembling {npz_path}: run again")
        if images is None:
            images = np.empty((plan.total, *shard["images"].shape[1:]), dtype=np.uint8)
            tokens = np.empty((plan.total, *shard["tokens"].shape[1:]), dtype=np.int32)
        images[indices.start:indices.stop] = shard["images"]
        tokens[indices.start:indices.stop] = shard["tokens"]
        labels[indices.start:indices.stop] = shard["labels"]
    _write_atomically(npz_path, lambda f: np.savez(f, arr_0=images, arr_1=labels, tokens=tokens))
    meta = {"identity": identity, "complete": True, "images": plan.total, "shape": list(images.shape),
            "sampling_seconds": seconds, "shards": len(shards)}
    _write_atomically(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    shutil.rmtree(parts, ignore_errors=True)
    return SampleFile(npz_path, plan.total, seconds, resumed)


def _inner_bar(label: str) -> Callable:
    """A factory for vLLM's per-request bar of one shard (LLM.generate's use_tqdm): below the run's bar, gone when
    the shard is done, named after the setting."""
    from tqdm.auto import tqdm

    def make(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "desc": label, "leave": False, "position": 1})
    return make


__all__ = ["SampleFile", "SamplePlan", "finished_samples", "sample_setting", "sample_shard"]
