"""Old path of `adsa_vllm.llamagen.t5_captions`, kept only while docs/ name it; remove once they name the new path."""

from adsa_vllm.llamagen.t5_captions import *  # noqa: F401,F403
from adsa_vllm.llamagen.t5_captions import __all__  # noqa: F401
