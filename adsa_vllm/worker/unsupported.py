"""Where `--attention-backend adsa` leads a model that does not build ADSA layers itself.

ADSA needs the model's cooperation (condition length, image grid, the ADSA KV spec); LlamaGen models resolve the
name to a real kernel in the config hook before the selector ever sees it. Any other model reaches this class,
whose only job is to fail with a message that says so.
"""

from vllm.v1.attention.backend import AttentionBackend

MESSAGE = ("attention backend 'adsa' works only with LlamaGen models (architecture LlamaGenForCausalLM, see "
           "adsa_vllm.convert); drop --attention-backend adsa for other models")


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
