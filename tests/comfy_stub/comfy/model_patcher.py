"""Stub of ``comfy.model_patcher``: ModelPatcher over a plain ``torch.nn.Module``.

Wrap a module that holds the network as ``.diffusion_model`` (as ComfyUI's ``BaseModel``
does), so state dict keys start with ``diffusion_model.``. Patch storage, cloning, key patches,
and patching weights on load follow ComfyUI 0.3.64, including a partial (lowvram) load: modules
that have ``comfy_cast_weights`` (ComfyUI's ``comfy.ops`` layers) and do not fit in the memory
given stay on the offload device, unpatched, with a ``LowVramPatch`` in ``weight_function`` that
applies the patches when the layer runs; the rest are patched and moved to the device. The
``CallbacksMP.ON_LOAD`` callbacks run at the end of every load and are copied by ``clone``.
Hooks, injections, other callbacks, wrappers and ``partially_unload`` are left out.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import uuid
from collections.abc import Callable
from typing import Any

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.utils
import torch
from comfy.patcher_extension import CallbacksMP

# The real backup entry is a namedtuple built inline under the name 'Dimension'.
BackupEntry = collections.namedtuple("BackupEntry", ["weight", "inplace_update"])


def string_to_seed(data: str | bytes) -> int:
    """CRC-32 of ``data`` (one char = one byte value): the per-key seed for fp8 rounding."""
    crc = 0xFFFFFFFF
    for item in data:
        crc ^= ord(item) if isinstance(item, str) else item
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def wipe_lowvram_weight(m: torch.nn.Module) -> None:
    """Undo a module's lowvram state (as the real one)."""
    if hasattr(m, "prev_comfy_cast_weights"):
        m.comfy_cast_weights = m.prev_comfy_cast_weights
        del m.prev_comfy_cast_weights
    if hasattr(m, "weight_function"):
        m.weight_function = []
    if hasattr(m, "bias_function"):
        m.bias_function = []


def move_weight_functions(m: torch.nn.Module, device: torch.device | None) -> int:
    """Move the weight functions' own tensors (none here: LowVramPatch has no ``move_to``)."""
    if device is None:
        return 0
    memory = 0
    for f in getattr(m, "weight_function", []) + getattr(m, "bias_function", []):
        if hasattr(f, "move_to"):
            memory += f.move_to(device=device)
    return memory


class LowVramPatch:
    """Applies a key's patches to the weight when a lowvram layer casts it (as the real one)."""

    def __init__(self, key: str, patches: dict, convert_func: Callable | None = None,
                 set_func: Callable | None = None) -> None:
        self.key = key
        self.patches = patches
        self.convert_func = convert_func
        self.set_func = set_func

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        intermediate_dtype = weight.dtype
        if self.convert_func is not None:
            weight = self.convert_func(weight.to(dtype=torch.float32, copy=True), inplace=True)
        if intermediate_dtype not in [torch.float32, torch.float16, torch.bfloat16]:
            intermediate_dtype = torch.float32
            out = comfy.lora.calculate_weight(self.patches[self.key], weight.to(intermediate_dtype),
                                              self.key, intermediate_dtype=intermediate_dtype)
            if self.set_func is None:
                return comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(self.key))
            return self.set_func(out, seed=string_to_seed(self.key), return_weight=True)
        out = comfy.lora.calculate_weight(self.patches[self.key], weight, self.key,
                                          intermediate_dtype=intermediate_dtype)
        if self.set_func is not None:
            return self.set_func(out, seed=string_to_seed(self.key), return_weight=True).to(dtype=intermediate_dtype)
        return out


def get_key_weight(model: torch.nn.Module, key: str) -> tuple[torch.Tensor, Callable | None, Callable | None]:
    """The tensor at ``key`` plus the owning op's optional ``set_<name>``/``convert_<name>`` hooks."""
    parent, sep, name = key.rpartition(".")
    if not sep:
        return comfy.utils.get_attr(model, key), None, None
    op = comfy.utils.get_attr(model, parent)
    set_func = getattr(op, f"set_{name}", None)
    convert_func = getattr(op, f"convert_{name}", None)
    weight = getattr(op, name)
    return weight, set_func, convert_func


def _no_convert(t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return t


class ModelPatcher:
    """Holds a model and a list of weight patches per state-dict key.

    ``patches[key]`` is a list of ``(strength_patch, value, strength_model, offset, function)``
    tuples in the order added. ``backup`` maps patched keys to their original weights and is
    shared with every clone (so any clone can restore a module another clone patched).
    """

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                 size: int = 0, weight_inplace_update: bool = False) -> None:
        self.size = size
        self.model = model
        if getattr(self.model, "device", None) is None:
            self.model.device = offload_device
        self.patches: dict[str, list[tuple]] = {}
        self.backup: dict[str, BackupEntry] = {}
        self.object_patches: dict[str, Any] = {}
        self.object_patches_backup: dict[str, Any] = {}
        self.weight_wrapper_patches: dict[str, list[Callable]] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.callbacks: dict[str, dict[str | None, list[Callable]]] = CallbacksMP.init_callbacks()
        self.model_size()
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.force_cast_weights = False
        self.patches_uuid = uuid.uuid4()
        self.parent: ModelPatcher | None = None
        self.attachments: dict[str, Any] = {}
        self.additional_models: dict[str, list[ModelPatcher]] = {}
        self.hook_backup: dict[str, tuple[torch.Tensor, torch.device]] = {}
        self.is_injected = False
        self.skip_injection = False
        # state the real patcher keeps on the shared module
        for attr, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                              ("model_lowvram", False), ("current_weight_patches_uuid", None)):
            if not hasattr(self.model, attr):
                setattr(self.model, attr, default)

    # --- sizes / identity --------------------------------------------------------------------

    def model_size(self) -> int:
        """Bytes of the model's state dict (cached)."""
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model)
        return self.size

    def loaded_size(self) -> int:
        """Bytes currently loaded on the load device."""
        return self.model.model_loaded_weight_memory

    def lowvram_patch_counter(self) -> int:
        return self.model.lowvram_patch_counter

    def model_dtype(self) -> torch.dtype | None:
        """``model.get_dtype()`` when the model has it (BaseModel does)."""
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()
        return None

    def clone(self) -> ModelPatcher:
        """New patcher on the *same* module: patch lists copied, backup dict shared."""
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.force_cast_weights = self.force_cast_weights
        n.attachments = dict(self.attachments)
        n.additional_models = {k: [m.clone() for m in v] for k, v in self.additional_models.items()}
        n.hook_backup = self.hook_backup
        n.callbacks = {k: {k1: c1.copy() for k1, c1 in c.items()} for k, c in self.callbacks.items()}
        return n

    def is_clone(self, other: Any) -> bool:
        """True when ``other`` wraps the same module object."""
        return hasattr(other, "model") and self.model is other.model

    def clone_has_same_weights(self, clone: ModelPatcher) -> bool:
        """Same module and the same patches (same uuid), or neither has patches."""
        if not self.is_clone(clone):
            return False
        if len(self.patches) == 0 and len(clone.patches) == 0:
            return True
        if self.patches_uuid == clone.patches_uuid:
            if len(self.patches) != len(clone.patches):
                logging.warning("WARNING: something went wrong, same patch uuid but different length of patches.")
                return False
            return True
        return False

    # --- object patches ----------------------------------------------------------------------

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str) -> Any:
        """Attribute at a dotted path, honouring object patches."""
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return comfy.utils.get_attr(self.model, name)

    def model_patches_to(self, device: Any) -> None:
        """Move transformer-option patches to ``device`` (none exist in tests)."""

    def model_patches_models(self) -> list[ModelPatcher]:
        """Extra models that transformer-option patches need loaded (none in the stub)."""
        return []

    def use_ejected(self, skip_and_inject_on_exit_only: bool = False) -> contextlib.AbstractContextManager:
        """Context in which injections are removed (the stub has none)."""
        return contextlib.nullcontext()

    # --- weight patches ----------------------------------------------------------------------

    def add_patches(self, patches: dict[Any, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[Any]:
        """Append ``patches`` (key -> patch value) to the patch lists; return the keys accepted.

        A key may be ``(key, offset)`` or ``(key, offset, function)``. Keys absent from the
        model's state dict are silently dropped (callers compare the returned list).
        """
        accepted = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = None
            function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                accepted.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(accepted)

    def get_key_patches(self, filter_prefix: str | None = None) -> dict[str, list]:
        """``{key: [(original weight, convert_func), *patches]}`` for every state-dict key.

        The first entry is the *unpatched* weight (from ``backup`` when the model is patched),
        which is what model-merging nodes pass to ``add_patches`` of another model.
        """
        out: dict[str, list] = {}
        for k in self.model_state_dict():
            if filter_prefix is not None and not k.startswith(filter_prefix):
                continue
            weight, _set_func, convert_func = get_key_weight(self.model, k)
            if k in self.backup:
                weight = self.backup[k].weight
            if k in self.hook_backup:
                weight = self.hook_backup[k][0]
            if convert_func is None:
                convert_func = _no_convert
            out[k] = [(weight, convert_func), *self.patches.get(k, [])]
        return out

    def model_state_dict(self, filter_prefix: str | None = None) -> dict[str, torch.Tensor]:
        """The module's state dict (patched weights if loaded), keys filtered by prefix."""
        sd = self.model.state_dict()
        if filter_prefix is not None:
            for k in list(sd.keys()):
                if not k.startswith(filter_prefix):
                    sd.pop(k)
        return sd

    def patch_weight_to_device(self, key: str, device_to: torch.device | None = None,
                               inplace_update: bool = False) -> None:
        """Back up the weight at ``key`` and replace it with the patched weight.

        Math is done on a float32 copy by ``comfy.lora.calculate_weight`` and cast back to the
        weight's dtype by ``comfy.float.stochastic_rounding``.
        """
        if key not in self.patches:
            return
        weight, set_func, convert_func = get_key_weight(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = BackupEntry(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        if device_to is not None:
            temp = comfy.model_management.cast_to_device(weight, device_to, torch.float32, copy=True)
        else:
            temp = weight.to(torch.float32, copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        if set_func is not None:
            set_func(out, inplace_update=inplace_update, seed=string_to_seed(key))
            return
        out = comfy.float.stochastic_rounding(out, weight.dtype, seed=string_to_seed(key))
        if inplace_update:
            comfy.utils.copy_to_param(self.model, key, out)
        else:
            comfy.utils.set_attr_param(self.model, key, out)

    def calculate_weight(self, patches: list[tuple], weight: torch.Tensor, key: str,
                         intermediate_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Deprecated alias of ``comfy.lora.calculate_weight`` (warns, like the real one)."""
        logging.warning("The ModelPatcher.calculate_weight function is deprecated, please use: "
                        "comfy.lora.calculate_weight instead")
        return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=intermediate_dtype)

    # --- load / unload -----------------------------------------------------------------------

    def _load_list(self) -> list[tuple[int, str, torch.nn.Module, list[str]]]:
        """Modules whose weights get patched on load: those owning *all* their parameters.

        Kept from ComfyUI: a module with its own parameters *and* children (e.g. a DiT root
        holding ``pos_embed``) is skipped, so patches on such parameters are never applied by a
        load even though ``load_lora`` accepted them.
        """
        loading = []
        for name, module in self.model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if any(n not in own for n, _ in module.named_parameters(recurse=True)):
                continue
            if hasattr(module, "comfy_cast_weights") or own:
                loading.append((comfy.model_management.module_size(module), name, module, own))
        return loading

    def load(self, device_to: torch.device | None = None, lowvram_model_memory: float = 0,
             force_patch_weights: bool = False, full_load: bool = False) -> None:
        """Patch and move modules to ``device_to`` while they fit in ``lowvram_model_memory``
        (everything with ``full_load``); the others stay put with a ``LowVramPatch``."""
        mem_counter = 0
        patch_counter = 0
        lowvram_counter = 0
        loading = sorted(self._load_list(), key=lambda x: (x[0], x[1]), reverse=True)
        load_completely = []
        for module_mem, n, m, params in loading:
            lowvram_weight = False
            weight_key = f"{n}.weight"
            bias_key = f"{n}.bias"
            if not full_load and hasattr(m, "comfy_cast_weights"):
                if mem_counter + module_mem >= lowvram_model_memory:
                    lowvram_weight = True
                    lowvram_counter += 1
                    if hasattr(m, "prev_comfy_cast_weights"):  # already lowvramed
                        continue
            cast_weight = self.force_cast_weights
            if lowvram_weight:
                if hasattr(m, "comfy_cast_weights"):
                    m.weight_function = []
                    m.bias_function = []
                for key, attr in ((weight_key, "weight_function"), (bias_key, "bias_function")):
                    if key in self.patches:
                        if force_patch_weights:
                            self.patch_weight_to_device(key)
                        else:
                            _, set_func, convert_func = get_key_weight(self.model, key)
                            setattr(m, attr, [LowVramPatch(key, self.patches, convert_func, set_func)])
                            patch_counter += 1
                cast_weight = True
            else:
                if hasattr(m, "comfy_cast_weights"):
                    wipe_lowvram_weight(m)
                if full_load or mem_counter + module_mem < lowvram_model_memory:
                    mem_counter += module_mem
                    load_completely.append((module_mem, n, m, params))
            if cast_weight and hasattr(m, "comfy_cast_weights"):
                m.prev_comfy_cast_weights = m.comfy_cast_weights
                m.comfy_cast_weights = True
            if weight_key in self.weight_wrapper_patches:
                m.weight_function.extend(self.weight_wrapper_patches[weight_key])
            if bias_key in self.weight_wrapper_patches:
                m.bias_function.extend(self.weight_wrapper_patches[bias_key])
            mem_counter += move_weight_functions(m, device_to)

        load_completely.sort(key=lambda x: (x[0], x[1]), reverse=True)
        for _, n, m, params in load_completely:
            if getattr(m, "comfy_patched_weights", False) is True:
                continue
            for param in params:
                self.patch_weight_to_device(f"{n}.{param}", device_to=device_to)
            m.comfy_patched_weights = True
        for _, _, m, _ in load_completely:
            m.to(device_to)

        if lowvram_counter > 0:
            logging.info(f"loaded partially {lowvram_model_memory / (1024 * 1024)} "
                         f"{mem_counter / (1024 * 1024)} {patch_counter}")
            self.model.model_lowvram = True
        else:
            logging.info(f"loaded completely {lowvram_model_memory / (1024 * 1024)} "
                         f"{mem_counter / (1024 * 1024)} {full_load}")
            self.model.model_lowvram = False
            if full_load:
                self.model.to(device_to)
                mem_counter = self.model_size()
        self.model.lowvram_patch_counter += patch_counter
        self.model.device = device_to
        self.model.model_loaded_weight_memory = mem_counter
        self.model.current_weight_patches_uuid = self.patches_uuid
        for callback in self.get_all_callbacks(CallbacksMP.ON_LOAD):
            callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    # --- callbacks (as in ComfyUI: {call_type: {key: [callables]}}) ------------------------

    def add_callback(self, call_type: str, callback: Callable) -> None:
        self.add_callback_with_key(call_type, None, callback)

    def add_callback_with_key(self, call_type: str, key: str | None, callback: Callable) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def get_callbacks(self, call_type: str, key: str | None) -> list[Callable]:
        return self.callbacks.get(call_type, {}).get(key, [])

    def get_all_callbacks(self, call_type: str) -> list[Callable]:
        return [c for cs in self.callbacks.get(call_type, {}).values() for c in cs]

    def patch_model(self, device_to: torch.device | None = None, lowvram_model_memory: float = 0,
                    load_weights: bool = True, force_patch_weights: bool = False) -> torch.nn.Module:
        """Apply object patches and (if ``load_weights``) patch the weights; return the module."""
        for k, obj in self.object_patches.items():
            old = comfy.utils.set_attr(self.model, k, obj)
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                      full_load=lowvram_model_memory == 0)
        return self.model

    def partially_load(self, device_to: torch.device, extra_memory: float = 0, force_patch_weights: bool = False) -> float:
        """What ``load_models_gpu`` calls: re-patch when another patch set (or a force) is asked."""
        current = self.model.current_weight_patches_uuid
        unpatch = current is not None and (current != self.patches_uuid or force_patch_weights)
        used = self.model.model_loaded_weight_memory
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch)
        if unpatch:
            extra_memory += used - self.model.model_loaded_weight_memory
        self.patch_model(load_weights=False)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        before = self.model.model_loaded_weight_memory
        full = before + extra_memory > self.model_size()
        try:
            self.load(device_to, lowvram_model_memory=before + extra_memory, force_patch_weights=force_patch_weights,
                      full_load=full)
        except Exception:
            self.detach()
            raise
        return self.model.model_loaded_weight_memory - before

    def unpatch_model(self, device_to: torch.device | None = None, unpatch_weights: bool = True) -> None:
        """Restore backed-up weights (if ``unpatch_weights``) and object patches."""
        if unpatch_weights:
            if self.model.model_lowvram:
                for m in self.model.modules():
                    move_weight_functions(m, device_to)
                    wipe_lowvram_weight(m)
                self.model.model_lowvram = False
                self.model.lowvram_patch_counter = 0
            for k, entry in list(self.backup.items()):
                if entry.inplace_update:
                    comfy.utils.copy_to_param(self.model, k, entry.weight)
                else:
                    comfy.utils.set_attr_param(self.model, k, entry.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0
            for m in self.model.modules():
                if hasattr(m, "comfy_patched_weights"):
                    del m.comfy_patched_weights
        for k, old in list(self.object_patches_backup.items()):
            comfy.utils.set_attr(self.model, k, old)
        self.object_patches_backup.clear()

    def detach(self, unpatch_all: bool = True) -> torch.nn.Module:
        """Move patches to the offload device and optionally unpatch everything."""
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model

    def current_loaded_device(self) -> torch.device:
        return self.model.device

    def cleanup(self) -> None:
        """Post-sampling cleanup (nothing to do in the stub)."""
