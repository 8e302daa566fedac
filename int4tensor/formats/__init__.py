"""Other projects' int4 checkpoint formats, to and from :class:`~int4tensor.Int4Tensor`.

* :mod:`.compressed_tensors`: ``pack-quantized`` W4A16, export and import;
* :mod:`.awq`: AutoAWQ GEMM, import;
* :mod:`.gptq`: GPTQ v1/v2, import;
* :mod:`.common`: int32 nibble packing (linear/AWQ orders) and the exact integer-zero bridge.

Each format module has ``parse_config(quantization_config) -> config``, ``MARKER`` (the key suffix
that marks a quantized module), ``SUFFIXES`` and ``import_weight(parts, config, name, dtype)``.
"""

from __future__ import annotations

from int4tensor.formats import awq, common, compressed_tensors, gptq

__all__ = ["FORMATS", "format_module", "awq", "gptq", "compressed_tensors", "common"]

#: ``quant_method`` in config.json -> format module.
FORMATS = {"compressed-tensors": compressed_tensors, "awq": awq, "gptq": gptq}


def format_module(quant_method: str):
    """The format module for a config.json ``quant_method``."""
    if quant_method not in FORMATS:
        raise ValueError(f"unsupported quant_method {quant_method!r}; int4tensor reads "
                         f"{sorted(FORMATS)} and its own 'int4tensor'")
    return FORMATS[quant_method]
