"""Lossless bf16 weight compression: "huffman" for distribution, "palette12" for runtime.

numpy-only on import; the JAX runtime decoder lives in ``infire_jax.compression.jax_decode``.
"""

from infire_jax.compression.codec import (
    KINDS,
    Compressed,
    decode,
    encode,
    from_bytes,
    to_bytes,
    transcode_to_palette12,
    validate,
)

__all__ = [
    "KINDS",
    "Compressed",
    "decode",
    "encode",
    "from_bytes",
    "to_bytes",
    "transcode_to_palette12",
    "validate",
]
