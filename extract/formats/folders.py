"""Model folders: a folder of shards, and Hugging Face diffusers model folders.

A diffusers folder (``model_index.json`` at its root) keeps each component in a subfolder:
the denoiser in ``transformer/`` (DiT models) or ``unet/``, text encoders in ``text_encoder/``,
``text_encoder_2/``, ``text_encoder_3/``, each a single safetensors file or shards with an index.
The denoiser's keys keep their diffusers names (``diffusers_keys.py`` writes the LoRA in the key
style ComfyUI maps for them); CLIP and T5 text encoders are named as ComfyUI's CLIP names them
(``text_encoders.<clip_l|clip_g|t5xxl>.transformer.<key>``, as in an SD3 checkpoint), so
``te_sources.py`` pairs them. Other text encoders (Llama, Qwen, UMT5 ...) are listed in the
report line and not read.
"""

from __future__ import annotations

import glob
import os

import torch

from .. import source_info
from ..errors import ExtractionInputError
from ..keys.te_keys import TE_PREFIX
from .sharded import ShardedSafetensorsSource, open_index

DENOISER_FOLDERS = ("transformer", "unet")
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_CLIP_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}


def _safetensors_in(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "*.safetensors")) if os.path.isfile(p))


def open_component(folder: str, open_file) -> object:  # noqa: ANN001 - the file opener
    """The weights of one folder: its index if it has one, else its single file, else its shards.

    ``open_file(path)`` opens one safetensors file (wrapping quantized ones); the result of a
    sharded folder is wrapped the same way by the caller (``dispatch.py``).
    """
    indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
    plain = [p for p in indexes if ".fp16." not in os.path.basename(p)]
    if len(plain) > 1 or (not plain and len(indexes) > 1):
        raise ExtractionInputError(
            f"{folder}: several index files ({', '.join(os.path.basename(p) for p in indexes)}); "
            "pass the one to use.")
    if indexes:
        return open_index((plain or indexes)[0])
    files = _safetensors_in(folder)
    if not files:
        raise ExtractionInputError(f"{folder}: no .safetensors files (or index) in this folder.")
    if len(files) == 1:
        return open_file(files[0])
    # Diffusers variants (``*.fp16.safetensors``) beside the full file: take the full one.
    full = [p for p in files if os.path.basename(p).split(".")[-2:-1] not in (["fp16"], ["bf16"])]
    if len(full) == 1:
        return open_file(full[0])
    return ShardedSafetensorsSource(files, name=f"{os.path.basename(os.path.abspath(folder))}/ "
                                                f"({len(files)} shards)")


def _encoder_name(source: object) -> str | None:
    """The ComfyUI CLIP name of a text encoder component, from its weights; None if unknown."""
    keys = set(source.keys())  # type: ignore[attr-defined]
    emb = "text_model.embeddings.token_embedding.weight"
    if emb in keys:
        return _CLIP_BY_WIDTH.get(source.shape(emb)[-1])  # type: ignore[attr-defined]
    if "shared.weight" in keys and any(k.startswith("encoder.block.") for k in keys):
        return "t5xxl"
    return None


class DiffusersFolderSource:
    """A diffusers model folder's denoiser and text encoders as one source."""

    host_weights = True  # file data: the streamer stages it like a plain file's

    def __init__(self, root: str, open_component_fn) -> None:  # noqa: ANN001
        self.path = root
        self.name = os.path.basename(os.path.abspath(root))
        present = [d for d in DENOISER_FOLDERS if os.path.isdir(os.path.join(root, d))]
        if len(present) != 1:
            raise ExtractionInputError(
                f"{root}: a diffusers folder needs exactly one of {', '.join(DENOISER_FOLDERS)}/ "
                f"(found {', '.join(present) or 'none'}). Pass the component folder itself.")
        self.parts: list[tuple[str, object, str]] = []   # (folder, source, key prefix)
        self.not_read: list[str] = []
        denoiser = open_component_fn(os.path.join(root, present[0]))
        self.parts.append((present[0], denoiser, ""))
        for folder in TEXT_ENCODER_FOLDERS:
            full = os.path.join(root, folder)
            if not os.path.isdir(full) or not (_safetensors_in(full) or glob.glob(
                    os.path.join(full, "*.safetensors.index.json"))):
                continue
            source = open_component_fn(full)
            enc = _encoder_name(source)
            if enc is None:
                self.not_read.append(folder)
                continue
            self.parts.append((folder, source, f"{TE_PREFIX}{enc}.transformer."))
        self._owner: dict[str, tuple[object, str]] = {}
        for _folder, source, prefix in self.parts:
            for k in source.keys():  # type: ignore[attr-defined]
                self._owner[prefix + k] = (source, k)

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        source, raw = self._owner[key]
        return tuple(source.shape(raw))  # type: ignore[attr-defined]

    def dtype(self, key: str) -> torch.dtype:
        source, raw = self._owner[key]
        return source.dtype(raw)  # type: ignore[attr-defined]

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        source, raw = self._owner[key]
        return source.get(raw, device, dtype)  # type: ignore[attr-defined]

    def format_of(self, key: str) -> str:
        source, raw = self._owner[key]
        return source_info.format_of(source, raw)  # type: ignore[arg-type]

    def quantization_noise(self, key: str) -> float | None:
        source, raw = self._owner[key]
        return source_info.quantization_noise(source, raw)  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = "; ".join(f"{folder}/ = {source_info.describe(src)}" for folder, src, _ in self.parts)  # type: ignore[arg-type]
        skipped = (f"; not read (text encoder type the pack does not map): "
                   f"{', '.join(self.not_read)}" if self.not_read else "")
        return f"{self.name} (diffusers folder): {parts}{skipped}"

    def identity_parts(self) -> list[object]:
        return [src for _f, src, _p in self.parts]


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) or (
        not _safetensors_in(path) and any(os.path.isdir(os.path.join(path, d))
                                          for d in DENOISER_FOLDERS))
