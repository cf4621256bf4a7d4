"""The calls the differential test makes, run the same way against the stub and the real ComfyUI.

``tests/integration/test_comfy_differential.py`` runs this file twice: in the pytest process against the
stub (``tests/comfy_stub`` on ``sys.path``) and, in a subprocess with ComfyUI's own Python
(``$COMFY_VENV/bin/python``), against the real ``comfy`` package of ``$COMFYUI_ROOT``, configured
as ``main.py --cpu`` would (no server). Both write the same result files; the test compares them.

``record(work, flavour)`` writes ``<work>/<flavour>.json`` and ``<work>/<flavour>_*.safetensors``:
- the generic UNet key map of a toy diffusion model (``comfy.lora.model_lora_keys_unet``);
- which keys of a mixed-format LoRA ``comfy.lora.load_lora`` leaves out ("lora key not loaded")
  and which ``ModelPatcher.add_patches`` accepts;
- every patched weight as ``comfy.lora.calculate_weight`` computes it, and the model's state
  dict after ``comfy.model_management.load_models_gpu`` (what ComfyUI actually runs with);
- what the pack's ``ComfyModelSource`` reads from that patcher, loaded and unloaded;
- device handling: the compute device, the interrupt exception and flag, ``free_memory``,
  ``get_free_memory`` and the progress hook's arguments;
- the LoraExtract node's output file for the patched model (real: run as ComfyUI runs nodes).
Real only (the stub has no architectures): the key maps of real tiny SD1.5 and SD3 models.

Usage as the subprocess: ``python tests/support/comfy_differential_calls.py COMFYUI_ROOT PACK_DIR WORK``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import types

PACK_NAME = "ComfyUI-LoRA-Extract"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def toy_state_dict():
    """A toy diffusion model's weights: leaf linear/conv/conv3d/norm modules, a parameter on a
    module with children (``pos_embed``) and a non-diffusion buffer, all seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {
        "diffusion_model.lin.weight": (6, 8), "diffusion_model.lin.bias": (6,),
        "diffusion_model.conv.weight": (5, 4, 3, 3), "diffusion_model.conv.bias": (5,),
        "diffusion_model.conv1.weight": (5, 4, 1, 1),
        "diffusion_model.conv3d.weight": (4, 3, 2, 3, 3),
        "diffusion_model.norm.weight": (6,), "diffusion_model.norm.bias": (6,),
        "diffusion_model.blocks.0.weight": (6, 6),
        "diffusion_model.pos_embed": (1, 4, 6),
        "sigmas": (4,),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def toy_lora():
    """A LoRA in every format the extraction and resize write or read, plus one key that
    matches nothing and one patch whose shapes do not fit (ComfyUI logs and skips it)."""
    import torch

    g = torch.Generator().manual_seed(1)

    def r(*s):
        return 0.1 * torch.randn(s, generator=g)
    return {
        "diffusion_model.lin.lora_up.weight": r(6, 2), "diffusion_model.lin.lora_down.weight": r(2, 8),
        "diffusion_model.lin.alpha": torch.tensor(1.0), "diffusion_model.lin.diff_b": r(6),
        "lora_unet_conv.lora_up.weight": r(5, 2, 1, 1), "lora_unet_conv.lora_down.weight": r(2, 4, 3, 3),
        "lora_unet_conv.alpha": torch.tensor(4.0),
        "diffusion_model.conv1.lora_B.weight": r(5, 3, 1, 1), "diffusion_model.conv1.lora_A.weight": r(3, 4, 1, 1),
        "diffusion_model.conv3d.lora_up.weight": r(4, 2, 1, 1, 1),
        "diffusion_model.conv3d.lora_down.weight": r(2, 3, 2, 3, 3),
        "diffusion_model.norm.diff": r(6), "diffusion_model.norm.diff_b": r(6),
        "diffusion_model.pos_embed.diff": r(1, 4, 6),
        "diffusion_model.blocks.0.lora_up.weight": r(6, 2), "diffusion_model.blocks.0.lora_down.weight": r(2, 5),
        "diffusion_model.nowhere.lora_up.weight": r(3, 2), "diffusion_model.nowhere.lora_down.weight": r(2, 3),
    }


def module_from_state_dict(sd):
    # helpers needs torch only. In the subprocess this file runs as a script, its folder first on
    # sys.path; the name ``tests`` is ComfyUI's own test package there, so no ``tests.support``.
    if __package__:
        from .helpers import module_from_state_dict as tree
    else:
        from helpers import module_from_state_dict as tree

    root = tree(sd, buffers=("sigmas",))
    # What model_lora_keys_unet reads besides the state dict: no UNet config, no aliases.
    root.model_config = types.SimpleNamespace(unet_config={})
    return root


def load_pack(pack_dir: str):
    """The pack as ComfyUI loads it (path-derived module name), or the installed one."""
    try:
        import lora_extract
        return lora_extract
    except ImportError:
        pass
    name = pack_dir.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def record(work: str, flavour: str, pack, run_node) -> None:
    """Make every call and write the results (see the module docstring)."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    out: dict = {}
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        base = toy_state_dict()
        lora = toy_lora()
        module = module_from_state_dict(base)
        key_map = comfy.lora.model_lora_keys_unet(module, {})
        out["generic_key_map"] = key_map
        n = len(warnings.messages)
        patches = comfy.lora.load_lora(lora, key_map)
        out["load_lora_warnings"] = sorted(warnings.messages[n:])
        patcher = comfy.model_patcher.ModelPatcher(module, torch.device("cpu"), torch.device("cpu"))
        out["added"] = sorted(patcher.add_patches(patches, 1.0))
        calc = {}
        n = len(warnings.messages)
        for key in sorted(patcher.patches):
            w = base[key].float().clone()
            calc[key] = comfy.lora.calculate_weight(patcher.patches[key], w, key).contiguous()
        out["calculate_warnings"] = sorted(warnings.messages[n:])
        save_file(calc, os.path.join(work, f"{flavour}_calc.safetensors"))

        adapter = importlib.import_module(pack.__name__ + ".nodes.comfy_adapter")
        source = adapter.ComfyModelSource(patcher, "model")
        save_file({k: source.get(k).contiguous() for k in source.keys()},
                  os.path.join(work, f"{flavour}_source_unloaded.safetensors"))
        mm.load_models_gpu([patcher], force_patch_weights=True)
        save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
                  os.path.join(work, f"{flavour}_loaded.safetensors"))
        save_file({k: source.get(k).contiguous() for k in source.keys()},
                  os.path.join(work, f"{flavour}_source_loaded.safetensors"))
        mm.unload_all_models()
        save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
                  os.path.join(work, f"{flavour}_unloaded.safetensors"))

        # Device handling.
        dev = mm.get_torch_device()
        out["device"] = str(dev)
        out["interrupt_is_exception"] = issubclass(mm.InterruptProcessingException, Exception)
        mm.interrupt_current_processing(True)
        try:
            mm.throw_exception_if_processing_interrupted()
            out["interrupt_raised"] = False
        except mm.InterruptProcessingException:
            out["interrupt_raised"] = True
        out["flag_after_raise"] = mm.processing_interrupted()
        mm.free_memory(1024, dev)
        out["free_memory_type"] = type(mm.get_free_memory(dev)).__name__
        out["total_memory_type"] = type(mm.get_total_memory(dev)).__name__
        seen = []
        comfy.utils.set_progress_bar_global_hook(
            lambda value, total, preview, prompt_id=None, node_id=None: seen.append(
                [value, total, preview, prompt_id, node_id]))
        bar = comfy.utils.ProgressBar(3)
        bar.update_absolute(5)
        bar.update(1)
        out["progress_hook_calls"] = seen
        comfy.utils.set_progress_bar_global_hook(None)

        # The node, on the base model and a clone carrying the LoRA (without the bad patches).
        tuned = patcher.clone()
        node_inputs = dict(finetuned_model=tuned, original_model=patcher, filename_prefix="loras/diff",
                           rank=4, lora_type="standard", algorithm="svd_linalg", lowrank_iters=7,
                           output_dtype="fp32", bias_diff=True, adaptive_param=0.15,
                           clamp_quantile=False)
        node_base = comfy.model_patcher.ModelPatcher(module_from_state_dict(base), torch.device("cpu"),
                                                     torch.device("cpu"))
        node_inputs["original_model"] = node_base
        nodes = node_classes(pack)
        res = run_node(nodes["LoraExtract"], node_inputs)
        out["node_file"] = res["result"][0]
        out["node_result_types"] = [type(v).__name__ for v in res["result"]]
        out["node_ui_keys"] = sorted(res["ui"])

        # The V3 schema as ComfyUI serves it (/object_info) and runs it.
        out["node_info"] = {name: _comparable_info(cls.GET_NODE_INFO_V1())
                            for name, cls in sorted(nodes.items())}
        out["node_v1_attrs"] = {name: {
            "FUNCTION": cls.FUNCTION, "RETURN_TYPES": list(cls.RETURN_TYPES),
            "RETURN_NAMES": list(cls.RETURN_NAMES), "OUTPUT_TOOLTIPS": list(cls.OUTPUT_TOOLTIPS),
            "OUTPUT_NODE": cls.OUTPUT_NODE, "CATEGORY": cls.CATEGORY,
            "DESCRIPTION": cls.DESCRIPTION} for name, cls in sorted(nodes.items())}
        out["v3_protocol"] = v3_protocol(nodes["LoraLoadComplete"])
    finally:
        logging.getLogger().removeHandler(warnings)
    with open(os.path.join(work, f"{flavour}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)


def node_classes(pack) -> dict:
    """The pack's nodes as ComfyUI registers them: through ``comfy_entrypoint`` (V3)."""
    import asyncio

    from comfy_api.latest import ComfyExtension

    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    asyncio.run(extension.on_load())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


# The node-info fields both ComfyUI versions serve the same way (newer ones add more fields,
# e.g. is_input_list, which the pack does not use).
INFO_FIELDS = ("input", "input_order", "output", "output_is_list", "output_name",
               "output_tooltips", "name", "display_name", "description", "category",
               "output_node", "deprecated", "experimental", "api_node")


def _comparable_info(info: dict) -> dict:
    return json.loads(json.dumps({k: info[k] for k in INFO_FIELDS}))


def class_clone(node_cls, hidden: dict):
    """The class clone the executor runs a node on: 0.3.64 passes the hidden inputs, newer
    versions a dict holding them under "hidden_inputs" (its V3 execution data)."""
    from comfy_api.latest import io

    if hasattr(io.HiddenHolder, "from_v3_data"):
        return node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return node_cls.PREPARE_CLASS_CLONE(hidden)


def v3_protocol(node_cls) -> dict:
    """What a V3 node sees and returns through the class clone ComfyUI runs it on."""
    from comfy_api.latest import io

    clone = class_clone(node_cls, {io.Hidden.unique_id: "12"})
    out: dict = {"unique_id": clone.hidden.unique_id, "prompt_is_none": clone.hidden.prompt is None}
    try:   # the real executor locks the clone when it calls execute; the stub's clone is locked
        from comfy_api.internal import lock_class
        locked = lock_class(clone)
    except ImportError:
        locked = clone
    try:
        locked.anything = 1
        out["locked"] = False
    except AttributeError:
        out["locked"] = True
    normalized = {}
    # (A returned dict is left out: 0.3.64 fails on it, newer versions take it; the pack returns
    # NodeOutput.)
    for name, value in (("tuple", (1, 2)), ("none", None)):
        class Probe(node_cls):
            @classmethod
            def execute(cls, _value=value, **_kw):
                return _value
        r = Probe.EXECUTE_NORMALIZED()
        normalized[name] = [list(r.result) if r.result is not None else None, r.ui]
    out["normalized"] = normalized
    made = io.NodeOutput(1, "x", ui={"text": ["t"]})
    out["node_output"] = [list(made.result), made.ui, made[1]]
    return out


def _jsonable(v):
    """A key map value: a model key, or (key, (dim, offset, size)[, convert function])."""
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v if not callable(x)]
    return v


def real_arch_key_maps() -> dict:
    """Real only: model_lora_keys_unet on real tiny SD1.5 and SD3 models (weights not needed)."""
    import comfy.lora
    import comfy.supported_models

    archs = {
        "sd15": ("SD15", {
            "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 1],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False}),
        "sd3": ("SD3", {
            "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2,
            "input_size": None, "adm_in_channels": 64,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 64, "out_features": 128}},
            "num_patches": 64, "pos_embed_max_size": 8,
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}),
    }
    maps = {}
    for name, (cls_name, cfg) in archs.items():
        model = getattr(comfy.supported_models, cls_name)(dict(cfg)).get_model({}, "")
        sd = model.state_dict()
        maps[name] = {"keys": {k: list(v.shape) for k, v in sd.items()},
                      "map": {k: _jsonable(v) for k, v in comfy.lora.model_lora_keys_unet(model, {}).items()}}
    return maps


def _real_main(comfy_root: str, pack_dir: str, work: str) -> None:
    sys.path.insert(0, comfy_root)  # the real ComfyUI, imported as its main.py does
    import comfy.cli_args
    import comfy.options  # noqa: F401  (args_parsing stays False: no argv parsed)

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = work
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    import torch

    folder_paths.set_output_directory(os.path.join(work, "real_output"))
    folder_paths.set_temp_directory(os.path.join(work, "real_temp"))
    pack = load_pack(pack_dir)

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        # main.py's hijack_progress, less the websocket
        mm.throw_exception_if_processing_interrupted()

    def run_node(cls, inputs):
        # execution.py: interrupt flag cleared per prompt, hook installed, inference mode; a V3
        # node runs on a locked clone of its class carrying the hidden inputs.
        from comfy_api.internal import make_locked_method_func
        from comfy_api.latest import io

        comfy.utils.set_progress_bar_global_hook(hook)
        mm.interrupt_current_processing(False)
        schema = cls.GET_SCHEMA()    # (0.3.64 also offers INPUT_TYPES(return_schema=True))
        hidden = {h: "7" if h == io.Hidden.unique_id else None for h in schema.hidden or []}
        cls.VALIDATE_CLASS()
        f = make_locked_method_func(cls, cls.FUNCTION, class_clone(cls, hidden))
        with torch.inference_mode():
            r = f(**inputs)
        return {"result": r.result, "ui": r.ui}

    record(work, "real", pack, run_node)
    with open(os.path.join(work, "real.json"), encoding="utf-8") as f:
        out = json.load(f)
    try:
        import comfyui_version
        out["comfyui_version"] = comfyui_version.__version__
    except ImportError:
        out["comfyui_version"] = "unknown"
    with open(os.path.join(work, "real.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    with open(os.path.join(work, "real_arch_key_maps.json"), "w", encoding="utf-8") as f:
        json.dump(real_arch_key_maps(), f)


if __name__ == "__main__":
    _real_main(*sys.argv[1:4])
