"""Make `--attention-backend adsa` / `LLM(attention_backend="adsa")` a valid backend name in vLLM 0.26."""

from __future__ import annotations

import copyreg

from adsa_vllm_patches import check_version

TARGET = "vllm.v1.attention.backends.registry.AttentionBackendEnum"
WHY = ("0.26 converts the backend string with AttentionBackendEnum[name.upper()], a closed enum: 'adsa' raises "
       "'Unknown attention backend'. We add a member ADSA, and a pickle reducer so processes that unpickle a config "
       "before loading plugins (spawned EngineCore/workers) rebuild the member by importing this module.")
VLLM_VERSIONS = ("0.26",)   # release series, see adsa_vllm_patches.check_version
RETIRED_BY = ("vLLM 0.33 AttentionBackendEnum.register(name, path) / register_backend('ADSA', ...) "
              "(dynamic backend names); still needs the pickle reducer there.")

NAME = "ADSA"
# What the selector would build if a model *without* ADSA support asked for it (see that class).
PATH = "adsa_vllm.worker.unsupported.ADSAUnsupportedBackend"


def adsa_member():
    apply()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum[NAME]


def _reduce(member):
    if member.name == NAME:
        return adsa_member, ()
    return type(member), (member.value,)


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    if NAME in E._member_map_:
        return
    check_version(VLLM_VERSIONS, __name__)
    member = object.__new__(E)
    member._name_, member._value_ = NAME, PATH
    member.__objclass__ = E
    member._sort_order_ = len(E._member_names_)
    type.__setattr__(E, NAME, member)
    E._member_map_[NAME] = member
    E._value2member_map_[PATH] = member
    E._member_names_.append(NAME)
    copyreg.pickle(E, _reduce)
