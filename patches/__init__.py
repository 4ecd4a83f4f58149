"""Changes vLLM itself lacks, one small module each (vllm-ascend `patch/` style).

The folder is patches/; it installs and imports as `adsa_vllm_patches` (pyproject.toml's package-dir), so no
generic top-level `patches` lands in site-packages.

Every module declares TARGET, WHY, VLLM_VERSIONS (the versions it was written and tested against), RETIRED_BY
(the upstream change that makes it unnecessary) and an idempotent `apply()` that keeps the original callable and
refuses to run on an untested vLLM version. `patches/README.md` is the ledger; tests/test_patches.py checks that
the ledger and these modules agree and that each patch really takes effect through vLLM's own entry points.
`patches/touchpoints.py` is not a patch: it is the ledger of vLLM internals the code relies on elsewhere.
"""

from __future__ import annotations

import importlib

PATCHES = ("adsa_vllm_patches.attention_backend_name", "adsa_vllm_patches.request_validation",
           "adsa_vllm_patches.engine_core_outputs_adsa_stats", "adsa_vllm_patches.prompt_embeds")


def apply_all() -> None:
    for name in PATCHES:
        importlib.import_module(name).apply()


def release_series(version: str) -> str:
    """"0.26.1+cpu" -> "0.26": patch releases of a series keep the internals a patch relies on."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_version(versions: tuple[str, ...], patch: str) -> None:
    """`versions` are release series ("0.26"): a 0.26.1 must not fail the plugin in every process."""
    import vllm
    if release_series(vllm.__version__) not in versions:
        raise RuntimeError(f"{patch} was written for vLLM {', '.join(versions)}.x, found {vllm.__version__}; "
                           "check patches/README.md for whether it is still needed before enabling it")
