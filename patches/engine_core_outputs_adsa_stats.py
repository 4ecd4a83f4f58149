"""Let the API process decode the ADSA numbers the scheduler attaches to its SchedulerStats (see
adsa_vllm/engine/stats.py for why they ride there)."""

# No `from __future__ import annotations`: msgspec resolves the struct's annotations against module globals, and the
# class below is built inside a function.
from adsa_vllm_patches import check_version

TARGET = "vllm.v1.engine.core_client.EngineCoreOutputs"
WHY = ("The EngineCore's MsgpackEncoder writes every field of the SchedulerStats subclass ADSASchedulerStats "
       "(its `adsa` numbers included), but the client's MsgpackDecoder(EngineCoreOutputs) decodes `scheduler_stats` "
       "as the declared SchedulerStats and drops unknown keys, so ADSA metrics never reached the stat loggers. "
       "The client module's EngineCoreOutputs becomes a subclass struct (same fields, same positions, same "
       "array_like encoding) whose `scheduler_stats` is typed ADSASchedulerStats; plain SchedulerStats payloads "
       "decode with adsa=None.")
VLLM_VERSIONS = ("0.26",)   # release series, see adsa_vllm_patches.check_version
RETIRED_BY = "no upstream way yet for a plugin scheduler to send extra per-step stats to the front-end"


def _subclass():
    from vllm.v1.engine import EngineCoreOutputs

    from adsa_vllm.engine.stats import ADSASchedulerStats

    class ADSAEngineCoreOutputs(EngineCoreOutputs, array_like=True, omit_defaults=True, gc=False):
        # Redeclared field: msgspec keeps its position in the base, so the wire format is unchanged.
        scheduler_stats: ADSASchedulerStats | None = None

    return ADSAEngineCoreOutputs


def apply() -> None:
    from vllm.v1.engine import core_client
    if getattr(core_client.EngineCoreOutputs, "_adsa_patched", False):
        return
    check_version(VLLM_VERSIONS, __name__)
    cls = _subclass()
    cls._adsa_patched = True
    cls._adsa_orig = core_client.EngineCoreOutputs
    # core_client looks the name up when a client is built (MsgpackDecoder(EngineCoreOutputs) in MPClient.__init__),
    # after plugins are loaded, so rebinding the module global reaches every client.
    core_client.EngineCoreOutputs = cls
