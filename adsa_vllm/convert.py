"""Old path of `adsa_vllm.llamagen.convert`, kept only while README.md and docs/ name it (`python -m
adsa_vllm.convert`, `from adsa_vllm.convert import load_config`); remove once they name the new path."""

from adsa_vllm.llamagen.convert import (ConversionError, convert, load_checkpoint, load_config,  # noqa: F401
                                        load_reference, main, save_model_folder)

if __name__ == "__main__":
    main()
