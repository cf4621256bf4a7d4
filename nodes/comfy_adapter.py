"""The one place that calls into ComfyUI internals.

ComfyUI's Python API changes between versions; keeping every call here means a version bump
touches one file. Everything is imported lazily inside functions, so importing the pack (for
the command line or the core tests) never imports ComfyUI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .comfy_gguf_weights import gguf_dequantize, is_gguf_weight

logger = logging.getLogger(__name__)

DIFFUSION_PREFIX = "diffusion_model."


# --- folders -------------------------------------------------------------------------------

def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def loras_directory() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def loras_directories() -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths("loras")


def temp_directory() -> str:
    import folder_paths

    return folder_paths.get_temp_directory()


def cache_directory() -> str:
    """The pack's cache folder inside ComfyUI's user folder (kept across restarts, unlike temp)."""
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "lora-extract", "cache")


def lora_file_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def model_file_names(folder: str) -> list[str]:
    """Files ComfyUI lists in a model folder (``checkpoints``, ``diffusion_models``, ...)."""
    import folder_paths

    return folder_paths.get_filename_list(folder)


def model_full_path(folder: str, name: str) -> str | None:
    import folder_paths

    return folder_paths.get_full_path(folder, name)


def save_preview_png(image, name: str) -> dict[str, str]:
    """Save a PIL image to ComfyUI's temp folder; the ``ui`` entry that previews it on the node.

    Same place and naming as ComfyUI's PreviewImage (``<name>_<counter>_.png`` in the temp
    folder, fast compression); the temp folder is emptied when ComfyUI starts.
    """
    import os

    import folder_paths

    temp = folder_paths.get_temp_directory()
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        name, temp, image.width, image.height)
    file = f"{filename}_{counter:05}_.png"
    image.save(os.path.join(folder, file), compress_level=1)
    return {"filename": file, "subfolder": subfolder, "type": "temp"}


# --- loading a LoRA (LoraLoader's way, plus what its load skips) --------------------------

# The key under which our ON_LOAD callback is registered on a patcher (once per patcher chain).
SKIPPED_PATCHES_CALLBACK = "lora_extract.apply_skipped_patches"


def load_lora_file(path: str) -> dict[str, torch.Tensor]:
    """A LoRA file as a state dict, read the way LoraLoader reads it."""
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def nonleaf_patch_keys(model: torch.nn.Module, keys) -> list[str]:
    """The patched keys that ``ModelPatcher.load`` never patches.

    ``load`` walks only modules whose parameters are all their own (``_load_list``: "skip random
    weights in non leaf modules"), so a parameter that sits directly on a module with
    parameter-holding sub-modules (WAN ``blocks.N.modulation``, SD3 ``pos_embed``) keeps its
    patch unapplied, although ``add_patches`` accepted it.
    """
    owners: dict[str, bool] = {}
    out = []
    for key in keys:
        if not isinstance(key, str):
            continue
        module_name = key.rpartition(".")[0]
        if module_name not in owners:
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                owners[module_name] = False
                continue
            own = {n for n, _ in module.named_parameters(recurse=False)}
            owners[module_name] = any(n not in own for n, _ in module.named_parameters(recurse=True))
        if owners[module_name]:
            out.append(key)
    return out


def _apply_skipped_patches(patcher, device_to=None, *_args, **_kwargs) -> None:
    """ON_LOAD callback: patch the parameters ``load`` skipped, through the patcher itself.

    ``patch_weight_to_device`` backs the original up in ``patcher.backup``, so ``unpatch_model``
    (unloading, or loading the same model with other patches or strengths) restores it exactly as
    it restores every other patched weight. A key already in the backup is patched already
    (backups are cleared on unpatch), so a second load does not add the patch twice. The weight
    is patched on the device it is on (full load: the load device; low-VRAM: left offloaded).
    """
    import comfy.model_patcher

    for key in nonleaf_patch_keys(patcher.model, list(patcher.patches)):
        if key in patcher.backup:
            continue
        weight, _set, _convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        patcher.patch_weight_to_device(key, device_to=weight.device)


def _ensure_skipped_patches_applied(patcher) -> list[str]:
    """Register :func:`_apply_skipped_patches` on ``patcher`` (once); the keys it will patch."""
    from comfy.patcher_extension import CallbacksMP

    if not patcher.get_callbacks(CallbacksMP.ON_LOAD, SKIPPED_PATCHES_CALLBACK):
        patcher.add_callback_with_key(CallbacksMP.ON_LOAD, SKIPPED_PATCHES_CALLBACK,
                                      _apply_skipped_patches)
    return nonleaf_patch_keys(patcher.model, list(patcher.patches))


def load_lora_complete(model, clip, lora: dict[str, torch.Tensor], strength_model: float,
                       strength_clip: float) -> tuple[object, object, list[str]]:
    """``comfy.sd.load_lora_for_models`` (what LoraLoader calls), then the skipped parameters.

    Returns the new MODEL, the new CLIP (``None`` without one) and the keys patched beyond what
    ComfyUI's own load applies.
    """
    import comfy.sd

    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
    extra: list[str] = []
    if new_model is not None:
        extra += _ensure_skipped_patches_applied(new_model)
    if new_clip is not None:
        extra += _ensure_skipped_patches_applied(new_clip.patcher)
    return new_model, new_clip, extra


# --- progress and interrupt ---------------------------------------------------------------

def progress_bar(total: int) -> Callable[[int, int, str], None]:
    """A progress callback driving ComfyUI's per-node progress bar."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total_: int, key: str) -> None:
        bar.update_absolute(done, total_)
    return update


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def send_progress_text(text: str, node_id: str | None) -> None:
    """Live status text on the node (newer ComfyUI); silently absent on older versions."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is not None:
        send(text, node_id)


# --- devices and memory -------------------------------------------------------------------

def compute_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def free_memory(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload models until ``bytes_needed`` are free on ``device``."""
    import comfy.model_management

    comfy.model_management.free_memory(bytes_needed, device)


def free_and_total_memory(device: torch.device) -> tuple[int, int]:
    import comfy.model_management

    free = comfy.model_management.get_free_memory(device)
    total = comfy.model_management.get_total_memory(device)
    return int(free), int(total)


def soft_empty_cache() -> None:
    import comfy.model_management

    comfy.model_management.soft_empty_cache()


# --- reading a MODEL ----------------------------------------------------------------------

def _stored_weight(patcher, key: str) -> tuple[torch.Tensor, Callable | None]:
    """The unpatched weight of ``key`` and ComfyUI's convert function for it, if any.

    A loaded model may hold patched weights in place; the original is then in the patcher's
    backup (shared between clones), exactly where ``get_key_patches`` looks for it.
    """
    import comfy.model_patcher

    weight, _set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    backup = getattr(patcher, "backup", {}).get(key)
    if backup is not None:
        weight = backup.weight
    hook_backup = getattr(patcher, "hook_backup", {}).get(key)
    if hook_backup is not None:
        weight = hook_backup[0]
    return weight, convert_func


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    if is_gguf_weight(weight):
        return gguf_dequantize(weight)
    # Quantized tensor subclasses (newer ComfyUI) know how to give back a float tensor.
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) and callable(getattr(weight, "dequantize", None)):
        return weight.dequantize()
    return weight


def _weight_shape(patcher, key: str, stored: torch.Tensor) -> tuple[int, ...] | None:
    """The real shape of ``key``; ``None`` for a state-dict entry that is no weight.

    ComfyUI-GGUF's layers write a placeholder state dict (``meta`` tensors of the byte shape,
    plus a ``<layer>.temp.weight`` sized for its memory estimate): the shape comes from the
    weight itself, and the placeholder with no weight behind it is not a key of the model.
    """
    if stored.device.type != "meta":
        return tuple(stored.shape)
    import comfy.model_patcher

    try:
        weight = comfy.model_patcher.get_key_weight(patcher.model, key)[0]
    except AttributeError:
        logger.debug("%s: placeholder state-dict entry without a weight, not a model key", key)
        return None
    return tuple(getattr(weight, "tensor_shape", weight.shape))


class ComfyModelSource:
    """A ComfyUI MODEL (ModelPatcher) as a weight source, weights computed as patched.

    Each ``get`` computes one weight in float32: the stored weight, dequantized and converted,
    plus the patcher's patches (upstream LoRAs) via ``comfy.lora.calculate_weight``. This works
    whether or not the model is loaded, never moves the whole model to the GPU, and never
    rounds the weight to the model's storage dtype before we take the difference.
    """

    # Its keys are every parameter of the model ComfyUI patches (extract/new_tensors.py).
    lists_every_parameter = True

    def __init__(self, patcher, name: str) -> None:
        self.patcher = patcher
        self.name = name
        sd = patcher.model_state_dict(filter_prefix=DIFFUSION_PREFIX)
        shapes = {k: _weight_shape(patcher, k, v) for k, v in sd.items()}
        self._shapes = {k: s for k, s in shapes.items() if s is not None}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        # Without autograd: ComfyUI's parameters require grad, and the inference_mode it runs
        # nodes under does not reach the threads that read weights ahead.
        with torch.no_grad():
            return self._get(key, device, dtype)

    def _get(self, key: str, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        import comfy.lora

        weight, convert_func = _stored_weight(self.patcher, key)
        w = _dequantize(weight).to(device=device, dtype=torch.float32, copy=True)
        if convert_func is not None:
            w = convert_func(w, inplace=True)
        patches = self.patcher.patches.get(key)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=torch.float32)
        return w if dtype is None or dtype == torch.float32 else w.to(dtype)

    # How each weight is stored: GGUF (ComfyUI-GGUF's GGMLTensor), fp8, scaled fp8 or ComfyUI's
    # per-layer quantization, read from what ComfyUI holds (comfy_weight_storage.py). The noise
    # costs a pass over codes: cached.
    def _stored(self, key: str) -> tuple[torch.Tensor, object | None]:
        import comfy.utils

        weight, _convert = _stored_weight(self.patcher, key)
        module = comfy.utils.get_attr(self.patcher.model, key.rsplit(".", 1)[0]) \
            if "." in key else None
        return weight, module

    def format_of(self, key: str) -> str:
        from .comfy_weight_storage import weight_format

        return weight_format(*self._stored(key))

    def quantization_noise(self, key: str) -> float | None:
        from .comfy_weight_storage import weight_noise

        cache = self.__dict__.setdefault("_noise_cache", {})
        if key not in cache:
            cache[key] = weight_noise(*self._stored(key))
        return cache[key]

    def describe(self) -> str:
        from .comfy_weight_storage import describe_model

        return describe_model(self.name, self.keys(), self.format_of)


# --- reading a CLIP -----------------------------------------------------------------------

TEXT_ENCODERS_PREFIX = "text_encoders."

# CLIP weights that ComfyUI's CLIP of a type has but never reads from that type's files, and the
# model does not use: SD1/SDXL checkpoints do not store CLIP-L's projection (ComfyUI drops it
# when saving them), so it stays uninitialised memory that differs between two loaded CLIPs
# (measured on ComfyUI 0.3.64). Extracting it would store noise.
UNLOADED_CLIP_KEYS = {
    "SD1ClipModel": ("clip_l.transformer.text_projection.weight",),
    "SDXLClipModel": ("clip_l.transformer.text_projection.weight",),
}
UNLOADED_REASON = ("not stored in {type} checkpoints and unused by the model: ComfyUI leaves it "
                   "uninitialised when loading, so its difference is noise")


def clip_patcher(clip, name: str):
    """The ModelPatcher of a ComfyUI CLIP (``CLIP.patcher``, around ``cond_stage_model``)."""
    from ..extract.errors import ExtractionInputError

    patcher = getattr(clip, "patcher", None)
    if patcher is None or not hasattr(patcher, "model_state_dict"):
        raise ExtractionInputError(
            f"{name}: expected a CLIP (from Load Checkpoint or Load CLIP), got "
            f"{type(clip).__name__}. Connect a CLIP output.")
    return patcher


def clip_type_name(clip) -> str:
    """The text-encoder class of a CLIP (``SD1ClipModel``, ``SDXLClipModel``...)."""
    return type(getattr(clip, "cond_stage_model", None)).__name__


class ComfyClipSource(ComfyModelSource):
    """A ComfyUI CLIP as a weight source, weights computed as patched (LoRAs on the CLIP).

    Keys are ``text_encoders.<key of cond_stage_model.state_dict()>``: the name the extraction
    uses for text encoders and the generic key ComfyUI's LoRA loader maps back to that weight.
    """

    def __init__(self, clip, name: str) -> None:
        self.patcher = clip_patcher(clip, name)
        self.name = name
        self.type_name = clip_type_name(clip)
        sd = self.patcher.model_state_dict()
        self._shapes = {TEXT_ENCODERS_PREFIX + k: tuple(v.shape) for k, v in sd.items()}
        reason = UNLOADED_REASON.format(type=self.type_name)
        self._left_out = {TEXT_ENCODERS_PREFIX + k: reason
                          for k in UNLOADED_CLIP_KEYS.get(self.type_name, ()) if k in sd}

    def left_out_keys(self) -> dict[str, str]:
        """Keys not to extract, with the reason (read by the key pairing)."""
        return dict(self._left_out)

    def get(self, key: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        return super().get(key[len(TEXT_ENCODERS_PREFIX):], device, dtype)

    def _stored(self, key: str) -> tuple[torch.Tensor, object | None]:
        return super()._stored(key[len(TEXT_ENCODERS_PREFIX):])

