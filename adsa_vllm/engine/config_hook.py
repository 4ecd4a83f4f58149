"""Engine configuration for LlamaGen models, run by vLLM at the top of `VllmConfig.__post_init__`
(registered in `MODELS_CONFIG_MAP["LlamaGenForCausalLM"]`, vLLM's per-architecture hook; process 0 only,
the result is pickled to EngineCore and workers).

* Image-token models have no tokenizer: skip its initialisation (prompts are token ids).
* `--attention-backend adsa` becomes `additional_config["adsa"]["enabled"] = True`, and the attention backend
  is reset to the kernel ADSA wraps (`adsa.inner_backend`, default the platform's choice), so every later
  consumer of the backend setting sees a real kernel.
* With ADSA on: validate the settings now (clear startup errors), block size 16 unless the user chose one,
  prefix caching off (holes in block lists and hashed prefixes do not mix), and install the ADSA scheduler
  (the async variant when async scheduling is on: GPU default) and the ADSA worker. On GPU the V1 model runner is
  chosen unless the user set VLLM_USE_V2_MODEL_RUNNER: it exposes the batch order on the host, so the builder never
  waits on the GPU (see worker/runtime.py).
"""

from __future__ import annotations

import os

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from adsa_vllm.config import SUPPORTED_BLOCK_SIZES, ADSAConfigError
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.settings import ADSASettings

ADSA_BACKEND_NAME = "ADSA"


class LlamaGenConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        model_config = vllm_config.model_config
        model_config.skip_tokenizer_init = True
        model_cfg = LlamaGenConfig.from_hf_dict(model_config.hf_config.to_dict())

        if vllm_config.additional_config is None:
            vllm_config.additional_config = {}
        adsa_raw = vllm_config.additional_config.get("adsa") or {}
        if not isinstance(adsa_raw, dict):
            raise ADSAConfigError('--additional-config "adsa" must be a JSON object, e.g. {"adsa": {"budget": 0.5}}')
        vllm_config.additional_config["adsa"] = adsa_raw
        attn = vllm_config.attention_config
        if attn.backend is not None and attn.backend.name == ADSA_BACKEND_NAME:
            adsa_raw["enabled"] = True
            attn.backend = _inner_backend(adsa_raw.get("inner_backend"))
        elif adsa_raw.get("inner_backend") and adsa_raw.get("enabled"):
            attn.backend = _inner_backend(adsa_raw["inner_backend"])

        settings = ADSASettings.from_additional_config(vllm_config.additional_config)
        if not settings.enabled:
            return
        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            cache.block_size = 16
            cache.user_specified_block_size = True  # or the CPU platform raises it to 128 afterwards
        if cache.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ADSAConfigError(f"--block-size {cache.block_size} is not supported by ADSA; use 16 or 32")
        settings.defaults.layout(block_size=cache.block_size, cls_token_num=model_cfg.cls_token_num,
                                 grid_size=model_cfg.grid_size)
        cache.enable_prefix_caching = False
        model_config.disable_cascade_attn = True  # a cascade prefix would be read through uncompacted tables
        from vllm.platforms import current_platform
        sched = vllm_config.scheduler_config
        if current_platform.is_cpu():
            sched.async_scheduling = False  # the CPU platform forces it off anyway
        elif sched.async_scheduling is None:
            sched.async_scheduling = True
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        sched.scheduler_cls = ("adsa_vllm.engine.scheduler.ADSAAsyncScheduler" if sched.async_scheduling
                               else "adsa_vllm.engine.scheduler.ADSAScheduler")
        additional = vllm_config.additional_config["adsa"]
        additional["async_lag"] = bool(sched.async_scheduling)
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = ("adsa_vllm.worker.worker.ADSACPUWorker" if current_platform.is_cpu()
                                   else "adsa_vllm.worker.worker.ADSAGPUWorker")


def _inner_backend(name: str | None):
    if name is None:
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    try:
        return AttentionBackendEnum[name.upper()]
    except (KeyError, ValueError):
        raise ADSAConfigError(f"adsa.inner_backend={name!r} is not a vLLM attention backend; use e.g. "
                              "FLASH_ATTN or TRITON_ATTN (CPU always uses CPU_ATTN)") from None
