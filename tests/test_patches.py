"""patches/: the ledger (patches/README.md) agrees with the modules, every patch is idempotent, refuses untested
vLLM versions, and really takes effect through vLLM's own entry points (config conversion, InputProcessor)."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import pytest

import adsa_vllm_patches
from adsa_vllm.settings import ADSASettings, EngineSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "patches" / "README.md"
MODULES = [importlib.import_module(name) for name in adsa_vllm_patches.PATCHES]
MODULE_IDS = [m.__name__ for m in MODULES]


# ====================================================================== ledger and declarations

@pytest.mark.parametrize("mod", MODULES, ids=MODULE_IDS)
def test_module_declares_target_why_versions_retired_by_apply(mod):
    import vllm
    assert isinstance(mod.TARGET, str) and mod.TARGET.strip()
    assert isinstance(mod.WHY, str) and len(mod.WHY) > 40
    assert isinstance(mod.VLLM_VERSIONS, tuple) and all(isinstance(v, str) for v in mod.VLLM_VERSIONS)
    assert adsa_vllm_patches.release_series(vllm.__version__) in mod.VLLM_VERSIONS, \
        "patch not declared for the installed vLLM"
    assert isinstance(mod.RETIRED_BY, str) and mod.RETIRED_BY.strip()
    assert callable(mod.apply)


def test_version_guard_accepts_patch_releases_and_refuses_other_series(monkeypatch):
    import vllm
    for ok in ("0.26.0", "0.26.1", "0.26.3+cpu"):
        monkeypatch.setattr(vllm, "__version__", ok)
        adsa_vllm_patches.check_version(("0.26",), "adsa_vllm_patches.x")
    for bad in ("0.27.0", "0.2.6", "1.26.0"):
        monkeypatch.setattr(vllm, "__version__", bad)
        with pytest.raises(RuntimeError,
                           match=r"adsa_vllm_patches\.x was written for vLLM 0\.26\.x, found .*patches/README"):
            adsa_vllm_patches.check_version(("0.26",), "adsa_vllm_patches.x")


def test_every_patch_module_is_listed():
    on_disk = {p.stem for p in (ROOT / "patches").glob("*.py") if p.stem not in ("__init__", "touchpoints")}
    assert {n.split(".", 1)[1] for n in adsa_vllm_patches.PATCHES} == on_disk, \
        "adsa_vllm_patches.PATCHES and patches/*.py disagree"


def test_readme_ledger_exists():
    assert README.is_file(), "patches/README.md (the ledger of vLLM patches) is missing"


@pytest.mark.parametrize("mod", MODULES, ids=MODULE_IDS)
def test_readme_ledger_names_each_patch_and_its_target(mod):
    if not README.is_file():
        pytest.fail("patches/README.md (the ledger of vLLM patches) is missing")
    text = README.read_text()
    short = mod.__name__.split(".", 1)[1]
    assert short in text or mod.__name__ in text, f"{mod.__name__} is not in patches/README.md"
    # TARGET may list several callables separated by commas: each must be in the ledger.
    for target in (t.strip() for t in mod.TARGET.split(",")):
        assert target in text or target.rsplit(".", 1)[-1] in text, f"TARGET {target!r} of {short} not in README"
    for v in mod.VLLM_VERSIONS:
        assert v in text


# ====================================================================== apply()

def test_apply_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.engine.input_processor import InputProcessor
    adsa_vllm_patches.apply_all()
    members = list(AttentionBackendEnum._member_names_)
    value_map = dict(AttentionBackendEnum._value2member_map_)
    methods = (InputProcessor._validate_model_inputs, InputProcessor.process_inputs)
    for _ in range(3):
        adsa_vllm_patches.apply_all()
        for mod in MODULES:
            mod.apply()
    assert list(AttentionBackendEnum._member_names_) == members and members.count("ADSA") == 1
    assert dict(AttentionBackendEnum._value2member_map_) == value_map
    assert (InputProcessor._validate_model_inputs, InputProcessor.process_inputs) == methods
    # The originals are kept, and are vLLM's (not a wrapper of a wrapper).
    assert {f.__module__ for f in InputProcessor._adsa_orig} == {"vllm.v1.engine.input_processor"}


def test_adsa_enum_member_behaves_like_a_member():
    adsa_vllm_patches.apply_all()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    m = E["ADSA"]
    assert E.ADSA is m and isinstance(m, E) and m in list(E) and m.name == "ADSA"
    assert E(m.value) is m
    assert pickle.loads(pickle.dumps(m)) is m
    assert pickle.loads(pickle.dumps({"backend": m, "other": E["CPU_ATTN"]})) == {"backend": m,
                                                                               "other": E["CPU_ATTN"]}


# ====================================================================== through vLLM's own factories

def test_attention_config_parses_adsa_string():
    adsa_vllm_patches.apply_all()
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    assert AttentionConfig(backend="adsa").backend is AttentionBackendEnum["ADSA"]
    assert AttentionConfig(backend="ADSA").backend is AttentionBackendEnum["ADSA"]


@pytest.fixture(scope="module")
def model_dir(model16):
    return model16[0]


def test_engine_args_convert_adsa_backend(model_dir):
    from vllm.engine.arg_utils import EngineArgs
    vc = EngineArgs(model=str(model_dir), attention_backend="adsa", dtype="float32").create_engine_config()
    backend = vc.attention_config.backend
    assert backend is None or backend.name != "ADSA", "ADSA must wrap a real kernel, not be the kernel"
    assert EngineSettings.from_vllm_config(vc).adsa is not None
    assert vc.scheduler_config.scheduler_cls == "adsa_vllm.engine.scheduler.ADSAScheduler"
    assert vc.cache_config.block_size == 16 and not vc.cache_config.enable_prefix_caching
    assert vc.parallel_config.worker_cls.startswith("adsa_vllm.worker.worker.ADSA")
    assert vc.model_config.skip_tokenizer_init


def test_config_hook_leaves_the_users_dict_untouched(model_dir):
    """The hook resolves the settings once into an EngineSettings that every process reads back from the config;
    the dict the user passed (and its nested objects) stays exactly as given."""
    import copy

    from vllm.engine.arg_utils import EngineArgs
    user = {"adsa": {"budget": 0.25, "policy": "streaming", "enabled": True}, "cfg": {"scale": 2.0}}
    given = copy.deepcopy(user)
    vc = EngineArgs(model=str(model_dir), attention_backend="adsa", dtype="float32",
                    additional_config=user).create_engine_config()
    assert user == given and vc.additional_config["adsa"] == given["adsa"]
    settings = EngineSettings.from_vllm_config(vc)
    assert settings == EngineSettings.from_vllm_config(pickle.loads(pickle.dumps(vc)))   # as workers get it
    assert isinstance(settings.adsa, ADSASettings) and settings.adsa.block_size == vc.cache_config.block_size
    assert (settings.adsa.defaults.budget, settings.adsa.defaults.policy) == (0.25, "streaming")
    assert settings.guidance.enabled and settings.guidance.defaults.scale == 2.0


def test_engine_args_without_adsa_stay_stock(model_dir):
    from vllm.engine.arg_utils import EngineArgs
    vc = EngineArgs(model=str(model_dir), dtype="float32").create_engine_config()
    assert EngineSettings.from_vllm_config(vc).adsa is None
    assert "adsa_vllm" not in str(vc.scheduler_config.scheduler_cls)
    assert "adsa_vllm" not in str(vc.parallel_config.worker_cls)


def _processor(model_dir, **kw):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor
    vc = EngineArgs(model=str(model_dir), dtype="float32", **kw).create_engine_config()
    return InputProcessor(vc)


def _process(proc, ids, **params):
    from vllm import SamplingParams
    return proc.process_inputs("req", {"prompt_token_ids": ids}, SamplingParams(**params),
                               supported_tasks=("generate",))


def test_input_processor_rejects_bad_class_id(model_dir):
    proc = _processor(model_dir)
    with pytest.raises(ValueError, match=r"512\.\.522.*class ids \[88\] out of range"):
        _process(proc, [600], max_tokens=4)
    with pytest.raises(ValueError, match=r"got 0 id\(s\)"):
        _process(proc, [], max_tokens=4)
    with pytest.raises(ValueError, match=r"max_tokens=300 is outside the image: this model emits 1\.\.256"):
        _process(proc, [513], max_tokens=300)
    req = _process(proc, [513], max_tokens=256)
    assert list(req.prompt_token_ids) == [513]


def test_input_processor_validates_each_request_once_with_its_prompts_length(model_dir, monkeypatch):
    """One hook for every model kind (process_inputs): the condition length is the processed prompt's, as the
    scheduler and worker count it (a c2i prompt's class ids here; a t2i caption's rows in test_vllm_t2i.py)."""
    import adsa_vllm.request_validation as request_validation
    calls = []
    monkeypatch.setattr(request_validation, "validate_request",
                        lambda params, limits, prompt_len=None: calls.append(prompt_len))
    _process(_processor(model_dir, attention_backend="adsa"), [513], max_tokens=4)
    assert calls == [1]


def test_input_processor_rejects_bad_adsa_overrides_and_any_without_adsa(model_dir):
    bad = dict(max_tokens=4, extra_args={"adsa": {"policy": "nope"}})
    with pytest.raises(ValueError, match=r"adsa\.policy='nope' is unknown"):
        _process(_processor(model_dir, attention_backend="adsa"), [513], **bad)
    # ADSA off: any "adsa" setting is rejected with the fix rather than ignored silently.
    with pytest.raises(ValueError, match=r"runs without ADSA.*--attention-backend adsa"):
        _process(_processor(model_dir), [513], **bad)
    _process(_processor(model_dir), [513], max_tokens=4)


def test_adsa_graphs_cover_max_num_seqs_unless_the_user_chose_sizes():
    """vLLM stops capturing CUDA graphs at 512 tokens per step by default; ADSA runs max_num_seqs sequences at once
    for most of a run, so the hook raises the limit to max_num_seqs, and leaves any size the user chose alone."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig

    from adsa_vllm.engine.config_hook import graphs_cover_max_num_seqs

    def limit(max_num_seqs, **user):
        vc = SimpleNamespace(compilation_config=CompilationConfig(**user),
                             scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
        graphs_cover_max_num_seqs(vc)
        return vc.compilation_config.max_cudagraph_capture_size

    assert limit(1024) == 1024
    assert limit(256) is None                       # vLLM's default (2 * 256, capped at 512) covers it
    assert limit(1024, max_cudagraph_capture_size=64) == 64
    assert limit(1024, cudagraph_capture_sizes=[1, 2, 4]) is None
