"""Where `--attention-backend adsa` leads a model that does not build ADSA layers itself.

ADSA needs the model's cooperation (condition length, image grid, the ADSA KV spec); the models of a family
(adsa_vllm/family.py) resolve the name to a real kernel in the config hook before the selector ever sees it. Any
other model reaches this class, whose only job is to fail with a message that says so.
"""

from vllm.v1.attention.backend import AttentionBackend

from adsa_vllm.family import FAMILIES

MESSAGE = (f"attention backend 'adsa' works only with the models of an adsa_vllm family (architectures "
           f"{', '.join(FAMILIES)}; adsa_vllm/family.py); drop --attention-backend adsa for other models")


class ADSAUnsupportedBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        return [MESSAGE]

    @staticmethod
    def get_impl_cls():
        raise ValueError(MESSAGE)

    @staticmethod
    def get_builder_cls():
        raise ValueError(MESSAGE)

    @staticmethod
    def get_kv_cache_shape(*args, **kwargs):
        raise ValueError(MESSAGE)
