"""Write GGUF model files from float weights, as ComfyUI-GGUF's tools write them.

For benchmarks (a Q8_0 row beside bf16/fp8) and tests. The conventions are those of
ComfyUI-GGUF's ``tools/convert.py`` plus its llama.cpp quantizer patch: 1-D tensors and tensors
of at most 1024 elements stay F32; a K-quant tensor whose rows are not a multiple of 256 falls
back to F16; tensors of more than 4 dimensions (Wan's patch embedding) are written F32 as its
``fix_5d_tensors.py`` adds them back; names are stored without ``model.diffusion_model.``; the
architecture goes in ``general.architecture``.

The ``gguf`` package does the file format and the quantization of the legacy types; it has no
K-quant quantizer, so :func:`quantize_q6_k` is a plain round-to-nearest one (not llama.cpp's
searched scales, but the same block layout, read back by ``gguf.quants``).

    python benchmarks/gguf_files.py --base b.safetensors --tuned t.safetensors --type Q8_0 --out DIR

Timing GGUF input against bf16: ``benchmarks/gguf_speed.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

import numpy as np

QUANTIZATION_THRESHOLD = 1024   # convert.py: tensors this small stay F32
MAX_DIMS = 4                    # ggml tensors have at most 4 dimensions
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# convert.py's ``keys_hiprec`` per architecture: substrings of keys kept in F32.
HIGH_PRECISION = {"wan": (".modulation",), "ltxv": ("scale_shift_table",),
                  "hidream": (".ff_i.gate.weight", "img_emb.emb_pos"), "cosmos": ("pos_embedder",)}


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q6_K blocks of float32 rows (row length a multiple of 256).

    Per 16 values an int8 scale, per 256 a float16 ``d``; value = d * scale * (code - 32).
    Returns uint8 rows of 210 bytes per 256 values (the layout ``gguf.quants`` dequantizes).
    """
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    blocks = rows.reshape(-1, 256)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    amax = np.abs(sub).max(axis=2)                       # (n, 16)
    sub_scale = amax / 31.0
    d = (sub_scale.max(axis=1) / 127.0).astype(np.float16)  # (n,)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(sub_scale / d32[:, None]), 0)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    step = d32[:, None] * sc.astype(np.float32)          # (n, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[:, :, None] > 0, np.rint(sub / step[:, :, None]), 0)
    code = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    low = (code & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (code >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
          | (high[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
    return out.reshape(rows.shape[0], -1)


def stored_type(key: str, shape: tuple[int, ...], target: str, arch: str = "wan") -> str:
    """The GGUF type convert.py + the quantizer give a float weight when asked for ``target``."""
    n = int(np.prod(shape)) if shape else 1
    if len(shape) <= 1 or n <= QUANTIZATION_THRESHOLD or len(shape) > MAX_DIMS:
        return "F32"
    if any(s in key for s in HIGH_PRECISION.get(arch, ())):
        return "F32"  # convert.py keeps these parameters in F32 (loaded as plain parameters)
    if target in K_QUANTS and shape[-1] % 256:
        return "F16"
    if target not in ("F32", "F16", "BF16", *K_QUANTS) and shape[-1] % 32:
        return "F16"
    return target


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    if type_name == "Q6_K":
        return quantize_q6_k(x)
    return gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType[type_name])


def write_gguf(path: str, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
               target: str, arch: str = "wan") -> dict[str, str]:
    """Write float tensors as a GGUF file quantized to ``target``; returns key -> stored type."""
    import gguf

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, str] = {}
    for key, x in items:
        for p in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(p):
                key = key[len(p):]
        x = np.asarray(x, dtype=np.float32)
        t = stored_type(key, tuple(x.shape), target, arch)
        data = x
        if x.ndim > MAX_DIMS:
            # fix_5d_tensors.py: stored flat F32 with its true shape in the metadata.
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(s) for s in x.shape])
            data = x.reshape(x.shape[0], -1)
        writer.add_tensor(key, quantize(data, t), raw_dtype=gguf.GGMLQuantizationType[t])
        types[key] = t
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def write_gguf_pair_from_safetensors(base: str, tuned: str, target: str, out_dir: str,
                                     arch: str = "wan") -> tuple[str, str]:
    """A base/fine-tune pair of safetensors files rewritten as GGUF ``target`` (tensor by tensor)."""
    from safetensors import safe_open

    paths = []
    for src in (base, tuned):
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + f"-{target}.gguf")
        with safe_open(src, "pt") as f:
            write_gguf(dst, ((k, f.get_tensor(k).float().numpy()) for k in f.keys()), target, arch)
        paths.append(dst)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="base model (.safetensors)")
    ap.add_argument("--tuned", help="fine-tuned model (.safetensors)")
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--arch", default="wan")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not (a.base and a.tuned):
        ap.error("--base and --tuned are needed")
    for p in write_gguf_pair_from_safetensors(a.base, a.tuned, a.type, a.out, a.arch):
        print(p)


if __name__ == "__main__":
    main()
