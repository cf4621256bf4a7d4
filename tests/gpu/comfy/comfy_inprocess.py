#!/usr/bin/env python3
"""Run the pack's nodes inside the real ComfyUI Python runtime (in-process, no HTTP server).

For each tiny architecture (sd15, sd3, flux_like, wan21):
  1. load base and tuned with ComfyUI's own loader, as UNETLoader does
     (folder_paths.get_full_path_or_raise + comfy.sd.load_diffusion_model -> ModelPatcher);
  2. LoraExtract.execute(...) and LoraExtractV2.execute(...) with the node defaults, except
     rank 8, algorithm svd_linalg, output_dtype fp32, clamp_quantile False (V2: vram_usage_mode
     aggressive), called as ComfyUI calls a node (instance, FUNCTION, inputs checked against
     INPUT_TYPES, under torch.inference_mode());
  3. each LoRA applied to the base model as LoraLoaderModelOnly does (comfy.utils.load_torch_file +
     comfy.sd.load_lora_for_models, strength 1), the patched weights computed
       fp32:  as ModelPatcher.patch_weight_to_device does before rounding (get_key_weight, cast to
              float32, convert_func, comfy.lora.calculate_weight), and
       saved: as ModelSave does (load_models_gpu(force_patch_weights=True) then
              model.state_dict_for_saving()), i.e. in the model's storage dtype;
     per changed tensor: rel_err = ||P - T|| / ||T - B||, divided by the optimal rank-8 error of
     the true difference (Eckart-Young, from the singular values of T - B, conv flattened), with B
     and T the weights as ComfyUI holds them (its dtype choice; --reference files: the files);
  4. informational: LoraValidate on each file; V1 and V2 files compared tensor by tensor; V2 run a
     second time on the same models (its resident-block path) and compared with its first file.
ComfyUI's log records are captured ("lora key not loaded", "NOT LOADED", "unet missing", ...).
Any exception in a step is caught, its traceback written to the log, and counted as a failure.

  python comfy_inprocess.py --device cpu|cuda [--comfy-root DIR] [--models-dir DIR] [--pack DIR]
      [--archs sd15 sd3 flux_like wan21] [--rank 8] [--log FILE] [--json FILE] [--work DIR]
      [--expect-digests FILE] [--reference held|files] [--unet-dtype default|bf16|fp16|fp32]
      [--no-validate] [--no-repeat] [--no-cuda-malloc] [--stack-dump-after S]
  python comfy_inprocess.py --print-digests DIR      # content digests of DIR/tiny_*.safetensors

Prints one line per architecture and a final `SUMMARY ok=N/8 ...`; exit 0 only when all pass.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import statistics
import struct
import sys
import tempfile
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.getcwd()  # the pack checkout's root (run from there)
ARCHS = ["sd15", "sd3", "flux_like", "wan21"]

# pass criteria for one node's LoRA (printed in the log)
MAX_MEDIAN_RATIO = 1.05      # median over matrix tensors of rel_err / optimal rank-k error
MAX_FULL_REL_ERR = 1e-3      # tensors stored whole (biases, norms, pos_embed, modulation ...)

log = logging.getLogger("harness")


def say(msg: str) -> None:
    """One line to the console and to the log."""
    print(msg, flush=True)
    log.info(msg)


# --------------------------------------------------------------------------- digests

def content_digest(path: str) -> str:
    """sha256 over sorted (key, dtype, shape, raw bytes): equal tensors give equal digests even
    when the safetensors header is laid out differently."""
    import torch
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def model_files(models_dir: str, archs) -> dict[str, str]:
    return {f"tiny_{a}_{v}.safetensors": os.path.join(models_dir, f"tiny_{a}_{v}.safetensors")
            for a in archs for v in ("base", "tuned")}


# --------------------------------------------------------------------------- log capture

class Capture(logging.Handler):
    """Keeps every WARNING+ record; a phase takes the slice logged during it."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, rec):
        try:
            self.records.append(rec.getMessage())
        except Exception:  # noqa: BLE001
            self.records.append(str(rec.msg))

    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> list[str]:
        return self.records[mark:]


def setup_logging(log_path: str) -> Capture:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fh = logging.FileHandler(log_path, mode="w")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    cap = Capture()
    root.addHandler(cap)
    logging.captureWarnings(True)
    return cap


def log_exc(what: str) -> str:
    tb = traceback.format_exc()
    log.error("EXCEPTION in %s:\n%s", what, tb)
    last = tb.strip().splitlines()[-1] if tb.strip() else "?"
    return last[:300]


# --------------------------------------------------------------------------- ComfyUI set-up

def setup_comfy(a, work: str):
    """Configure ComfyUI like `main.py --cpu` (or the default CUDA start) would, then import it."""
    if a.comfy_root not in sys.path:
        sys.path.insert(0, a.comfy_root)
    if "torch" in sys.modules:
        log.warning("torch imported before ComfyUI's set-up (cuda_malloc cannot take effect)")
    import comfy.cli_args
    import comfy.options  # noqa: F401  (args_parsing stays False: ComfyUI parses no argv)
    args = comfy.cli_args.args
    args.base_directory = work          # --base-directory: models/, output/, temp/, input/, user/ under work
    args.cpu = a.device == "cpu"        # --cpu
    args.disable_cuda_malloc = bool(a.no_cuda_malloc)
    if a.unet_dtype != "default":       # --bf16-unet / --fp16-unet / --fp32-unet
        setattr(args, f"{a.unet_dtype}_unet", True)
    if a.device == "cuda" and not a.no_cuda_malloc:
        import cuda_malloc  # noqa: F401  what main.py does before torch: backend:cudaMallocAsync on +cu torch
    import comfy.lora  # noqa: F401
    import comfy.model_management as mm
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils
    import folder_paths
    import torch

    # main.py's apply_custom_paths + our models folder (what extra_model_paths.yaml would add)
    out_dir = os.path.join(work, "output")
    folder_paths.set_output_directory(out_dir)
    folder_paths.set_temp_directory(os.path.join(work, "temp"))
    folder_paths.set_input_directory(os.path.join(work, "input"))
    for d in ("output", "temp", "input", os.path.join("models", "loras")):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", os.path.abspath(a.models_dir))
    folder_paths.add_model_folder_path("loras", os.path.join(out_dir, "loras"))

    # progress hook as main.py's hijack_progress installs it (interrupt check + forward)
    progress_calls = {"n": 0}

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        progress_calls["n"] += 1
    comfy.utils.set_progress_bar_global_hook(hook)

    dev = mm.get_torch_device()
    info = {
        "torch": torch.__version__, "python": sys.version.split()[0],
        "comfyui": _comfy_version(a.comfy_root), "device": str(dev),
        "device_name": mm.get_torch_device_name(dev), "vram_state": mm.vram_state.name,
        "cpu_state": mm.cpu_state.name, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "folder_paths_base": folder_paths.base_path,
    }
    if a.device == "cuda" and dev.type != "cuda":
        raise RuntimeError(f"--device cuda but ComfyUI picked {dev} (torch.cuda.is_available()="
                           f"{torch.cuda.is_available()})")
    if a.device == "cpu" and dev.type != "cpu":
        raise RuntimeError(f"--device cpu but ComfyUI picked {dev}")
    return info, progress_calls


def _comfy_version(root: str) -> str:
    try:
        ns: dict = {}
        with open(os.path.join(root, "comfyui_version.py")) as f:
            exec(f.read(), ns)
        v = ns.get("__version__", "?")
    except OSError:
        v = "?"
    try:
        with open(os.path.join(root, "COMFYUI_COMMIT.txt")) as f:
            v += " " + f.read().strip()[:8]
    except OSError:
        pass
    return v


def install_prompt_server_stub(messages: list):
    """ComfyUI's `server` module is not imported in-process (no HTTP server). When the pack calls
    PromptServer.instance.send_progress_text(text, node_id) it gets this stand-in, which packs
    the message exactly as 0.3.64's server.py does (so a wrong type still raises) and records it."""
    try:
        import server  # noqa: F401  a real one, if this ComfyUI copy has it importable
        if getattr(server.PromptServer, "instance", None) is not None:
            return "real"
    except Exception:  # noqa: BLE001
        pass
    mod = types.ModuleType("server")

    class PromptServer:
        instance = None

        def send_progress_text(self, text, node_id, sid=None):
            if isinstance(text, str):
                text = text.encode("utf-8")
            node_id_bytes = str(node_id).encode("utf-8")
            message = struct.pack(">I", len(node_id_bytes)) + node_id_bytes + text
            messages.append((str(node_id), text.decode("utf-8", "replace"), len(message)))

    PromptServer.instance = PromptServer()
    mod.PromptServer = PromptServer
    sys.modules["server"] = mod
    return "stub"


# --------------------------------------------------------------------------- nodes

def node_inputs(cls, overrides: dict, unique_id: str) -> dict:
    """The inputs a freshly added node holds (widget defaults, first combo entry), with
    `overrides`; checked the way ComfyUI's validate_inputs checks widget values."""
    spec = cls.INPUT_TYPES()
    out = {}
    problems = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 else {}
            if typ == "COMBO":                 # a V3 combo: its choices are in the options
                typ = list(opts.get("options", []))
            if name in overrides:
                v = overrides[name]
            elif isinstance(typ, (list, tuple)):
                v = opts.get("default", typ[0] if typ else None)
            elif typ in ("INT", "FLOAT", "STRING", "BOOLEAN") and "default" in opts:
                v = opts["default"]
            else:
                continue                      # a link input (MODEL, ...) or forceInput: given by the caller
            if isinstance(typ, (list, tuple)) and v not in typ:
                problems.append(f"{name}={v!r} not in {list(typ)[:8]}")
            if typ in ("INT", "FLOAT"):
                if "min" in opts and v < opts["min"] or "max" in opts and v > opts["max"]:
                    problems.append(f"{name}={v} outside [{opts.get('min')}, {opts.get('max')}]")
            out[name] = v
    out["__hidden__"] = {"UNIQUE_ID": unique_id}   # V3: given on the class clone, not as inputs
    unknown = [k for k in overrides if k not in out]
    if unknown:
        problems.append(f"overrides not among the inputs: {unknown}")
    if problems:
        raise ValueError(f"{cls.__name__}: input validation: " + "; ".join(problems))
    return out


_STACKS = {"file": None, "after": 90.0}


def _class_clone(cls, hidden: dict):
    """The class clone ComfyUI runs a V3 node on (0.3.64 passes the hidden inputs, newer
    versions a dict holding them under "hidden_inputs"; the stub takes both)."""
    from comfy_api.latest import io

    hidden = {io.Hidden.unique_id: hidden.get("UNIQUE_ID")}
    if hasattr(io.HiddenHolder, "from_v3_data"):
        return cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return cls.PREPARE_CLASS_CLONE(hidden)


def call_node(cls, inputs: dict):
    """As ComfyUI's executor does for a V3 node: execute through its FUNCTION on a class clone
    carrying the hidden inputs, under inference_mode; returns {"result", "ui"}.
    A call still running after --stack-dump-after seconds gets every thread's stack in the log."""
    import faulthandler

    import torch
    inputs = dict(inputs)
    clone = _class_clone(cls, inputs.pop("__hidden__", {}))
    if _STACKS["file"] is not None:
        faulthandler.dump_traceback_later(_STACKS["after"], repeat=False, file=_STACKS["file"])
    try:
        with torch.inference_mode():
            out = getattr(clone, cls.FUNCTION)(**inputs)
            return {"result": out.result, "ui": out.ui}
    finally:
        if _STACKS["file"] is not None:
            faulthandler.cancel_dump_traceback_later()


def check_outputs(cls, res) -> list[str]:
    """The node's return against its RETURN_TYPES (what downstream nodes rely on)."""
    import torch
    bad = []
    if not isinstance(res, dict) or "result" not in res:
        return [f"returned {type(res).__name__}, not a dict with 'result'"]
    result = res["result"]
    if len(result) != len(cls.RETURN_TYPES):
        bad.append(f"{len(result)} outputs for RETURN_TYPES {cls.RETURN_TYPES}")
    for typ, v in zip(cls.RETURN_TYPES, result, strict=True):
        if typ == "STRING" and not isinstance(v, str):
            bad.append(f"STRING output is {type(v).__name__}")
        if typ == "IMAGE":
            if not (isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[-1] == 3):
                bad.append(f"IMAGE output {getattr(v, 'shape', type(v))}")
            elif not (v.dtype == torch.float32 and float(v.min()) >= 0 and float(v.max()) <= 1):
                bad.append(f"IMAGE output dtype {v.dtype} range [{float(v.min())}, {float(v.max())}]")
    ui = res.get("ui")
    if ui is not None:
        import folder_paths
        for img in ui.get("images", []):
            p = os.path.join(folder_paths.get_temp_directory(), img.get("subfolder", ""), img["filename"])
            if not os.path.isfile(p):
                bad.append(f"ui preview {img['filename']} missing")
    return bad


# --------------------------------------------------------------------------- reference data

def load_file_fp32(path: str) -> dict:
    import torch
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}


def reference(base_sd: dict, tuned_sd: dict, rank: int, dev) -> dict:
    """Per changed tensor: delta norm, kind, optimal rank-k error (matrices)."""
    import torch
    ref = {}
    for k, t in tuned_sd.items():
        b = base_sd.get(k)
        if b is None or b.shape != t.shape or torch.equal(b, t):
            continue
        d = t.to(dev) - b.to(dev)            # exact: both are fp16 values held in float32
        dn = float(d.double().norm())
        row = {"shape": list(t.shape), "delta_norm": dn, "matrix": t.ndim >= 2 and k.endswith(".weight")}
        if row["matrix"]:
            m = d.reshape(d.shape[0], -1)
            s = torch.linalg.svdvals(m).double()   # float32 SVD: tail/total to ~1e-6, plenty here
            r = min(rank, m.shape[0], m.shape[1])
            row["opt"] = float(s[r:].norm() / s.norm()) if float(s.norm()) > 0 else 0.0
        ref[k] = row
    return ref


def strip_prefix(sd: dict, keys_ref) -> dict:
    best, best_n = "", sum(1 for k in sd if k in keys_ref)
    for p in ("model.diffusion_model.", "diffusion_model.", "model.model.", "model."):
        n = sum(1 for k in sd if k.startswith(p) and k[len(p):] in keys_ref)
        if n > best_n:
            best, best_n = p, n
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}


def score(patched: dict, base_sd: dict, tuned_sd: dict, ref: dict, dev) -> dict:
    """rel_err per changed tensor, ratio to optimal for matrices; coverage."""
    import torch
    ratios, full_errs, exact_errs, rows = [], [], [], {}
    missing = []
    for k, r in ref.items():
        p = patched.get(k)
        if p is None:
            missing.append(k)
            continue
        t = tuned_sd[k].to(dev, torch.float64)
        e = float((p.to(dev, torch.float64) - t).norm()) / r["delta_norm"]
        row = {"rel_err": e}
        if r["matrix"] and r.get("opt", 0) > 1e-6:
            row["ratio"] = e / r["opt"]
            ratios.append((row["ratio"], k))
        elif r["matrix"]:
            exact_errs.append((e, k))      # rank >= the matrix rank: reproducible exactly
        else:
            full_errs.append((e, k))
        rows[k] = row
    ratios.sort()
    out = {
        "compared": len(rows), "missing": missing,
        "median_ratio": statistics.median([x for x, _ in ratios]) if ratios else None,
        "max_ratio": ratios[-1][0] if ratios else None, "worst_ratio_key": ratios[-1][1] if ratios else None,
        "n_ratio_gt_1_5": sum(1 for x, _ in ratios if x > 1.5),
        "full_max_rel_err": max(full_errs)[0] if full_errs else None,
        "full_worst_key": max(full_errs)[1] if full_errs else None,
        "exact_max_rel_err": max(exact_errs)[0] if exact_errs else None,
        "rows": rows,
    }
    return out


def lora_file_facts(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")})
        meta = f.metadata() or {}
    suffixes: dict[str, int] = {}
    for k in keys:
        s = next((x for x in (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff_b", ".diff") if k.endswith(x)), "other")
        suffixes[s] = suffixes.get(s, 0) + 1
    return {"tensors": len(keys), "dtypes": dtypes, "ranks": ranks, "suffixes": suffixes,
            "bytes": os.path.getsize(path), "metadata_keys": sorted(meta)[:12]}


# --------------------------------------------------------------------------- one architecture

def fmt(x, nd=4):
    return "na" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def patched_fp32(mp, keys, dev) -> dict:
    """What ModelPatcher.patch_weight_to_device computes before rounding to the storage dtype."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch
    out = {}
    for k in keys:
        full = "diffusion_model." + k
        weight, _set_func, convert_func = comfy.model_patcher.get_key_weight(mp.model, full)
        bk = mp.backup.get(full)
        if bk is not None:
            weight = bk.weight
        w = mm.cast_to_device(weight, dev, torch.float32, copy=True)
        if convert_func is not None:
            w = convert_func(w, inplace=True)
        if full in mp.patches:
            w = comfy.lora.calculate_weight(mp.patches[full], w, full)
        out[k] = w
    return out


def compare_lora_files(p1: str, p2: str) -> str:
    """same (bitwise) | close(max_rel=..) (every tensor within 1e-4) | differs(...)."""
    import torch
    from safetensors import safe_open
    worst, n = 0.0, 0
    with safe_open(p1, "pt") as f1, safe_open(p2, "pt") as f2:
        if set(f1.keys()) != set(f2.keys()):
            return f"differs(keys: {len(set(f1.keys()) ^ set(f2.keys()))} not in both)"
        for k in f1.keys():
            x, y = f1.get_tensor(k), f2.get_tensor(k)
            if x.shape != y.shape:
                return f"differs(shape of {k})"
            if not torch.equal(x, y):
                n += 1
                worst = max(worst, float((x.double() - y.double()).norm() / max(float(x.double().norm()), 1e-30)))
    if n == 0:
        return "same"
    return f"{'close' if worst <= 1e-4 else 'differs'}({n}_tensors,max_rel={worst:.1e})"


def repeat_same(first: dict, nodes_map: dict, overrides: dict, tuned_mp, base_mp, uid_counter: list) -> str:
    """LoraExtractV2 again on the same two models (its resident blocks are meant to be reused),
    compared with the first V2 file."""
    if "lora_path" not in first:
        return "skipped"
    try:
        cls = nodes_map["LoraExtractV2"]
        uid_counter[0] += 1
        inputs = node_inputs(cls, overrides, unique_id=str(uid_counter[0]))
        inputs.update(finetuned_model=tuned_mp, original_model=base_mp)
        t0 = time.time()
        path = call_node(cls, inputs)["result"][0]
        return f"{compare_lora_files(first['lora_path'], path)} t={time.time() - t0:.1f}s"
    except Exception:  # noqa: BLE001
        return "FAIL " + log_exc("LoraExtractV2 repeat")


def run_arch(arch: str, a, cap: Capture, nodes_map: dict, dev, uid_counter: list) -> dict:
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    import torch

    res = {"arch": arch, "nodes": {}, "errors": []}
    t0 = time.time()
    names = {v: f"tiny_{arch}_{v}.safetensors" for v in ("base", "tuned")}
    mps = {}
    mark = cap.mark()
    try:
        with torch.inference_mode():      # UNETLoader runs as a node too
            for v, n in names.items():
                path = folder_paths.get_full_path_or_raise("diffusion_models", n)
                mps[v] = comfy.sd.load_diffusion_model(path, model_options={})
        base_mp, tuned_mp = mps["base"], mps["tuned"]
        res["model_class"] = type(base_mp.model).__name__
        res["model_dtype"] = str(base_mp.model.get_dtype()).replace("torch.", "")
        res["t_load"] = round(time.time() - t0, 1)
        res["load_warnings"] = [m for m in cap.since(mark)
                                if any(s in m for s in ("unet missing", "unet unexpected", "left over", "missing", "unexpected"))][:10]
    except Exception:  # noqa: BLE001
        res["errors"].append("load: " + log_exc(f"{arch} load"))
        res["secs"] = round(time.time() - t0, 1)
        return res

    # reference: the weights as ComfyUI holds them (its dtype choice: e.g. bf16 for HunyuanVideo on a
    # GPU, where the fp16 files' values are rounded on load); --reference files: the files' values
    tr = time.time()
    try:
        def held_fp32(mp):
            sd = mp.model_state_dict(filter_prefix="diffusion_model.")
            return {k[len("diffusion_model."):]: v.detach().to("cpu", torch.float32, copy=True) for k, v in sd.items()}
        with torch.inference_mode():
            held_base, held_tuned = held_fp32(base_mp), held_fp32(tuned_mp)
        file_base = load_file_fp32(folder_paths.get_full_path("diffusion_models", names["base"]))
        file_tuned = load_file_fp32(folder_paths.get_full_path("diffusion_models", names["tuned"]))
        res["not_in_model"] = sorted(set(file_base) - set(held_base))[:10]
        res["held_differs"] = sum(1 for src, held in ((file_base, held_base), (file_tuned, held_tuned))
                                  for k, v in src.items() if k in held and not torch.equal(held[k], v))
        if a.reference == "files":
            base_sd, tuned_sd = file_base, file_tuned
            del held_base, held_tuned
        else:
            base_sd, tuned_sd = held_base, held_tuned
            del file_base, file_tuned
        ref = reference(base_sd, tuned_sd, a.rank, dev)
        res["tensors"] = len(tuned_sd)
        res["changed"] = len(ref)
        res["t_reference"] = round(time.time() - tr, 1)
    except Exception:  # noqa: BLE001
        res["errors"].append("reference: " + log_exc(f"{arch} reference"))
        res["secs"] = round(time.time() - t0, 1)
        return res

    common = {"rank": a.rank, "algorithm": "svd_linalg", "output_dtype": "fp32", "clamp_quantile": False}
    plan = [("v1", "LoraExtract", dict(common)),
            ("v2", "LoraExtractV2", dict(common, vram_usage_mode="aggressive"))]
    if not a.no_repeat:
        plan.append(("v2again", "LoraExtractV2", dict(common, vram_usage_mode="aggressive")))
    for tag, node_name, overrides in plan:
        if tag == "v2again":
            res["v2_repeat"] = repeat_same(res["nodes"].get("v2", {}), nodes_map, overrides, tuned_mp, base_mp, uid_counter)
            continue
        r = {"node": node_name, "ok": False}
        res["nodes"][tag] = r
        cls = nodes_map.get(node_name)
        tn = time.time()
        try:
            if cls is None:
                raise KeyError(f"{node_name} not in NODE_CLASS_MAPPINGS")
            uid_counter[0] += 1
            inputs = node_inputs(cls, overrides, unique_id=str(uid_counter[0]))
            inputs["finetuned_model"] = tuned_mp
            inputs["original_model"] = base_mp
            r["inputs"] = {k: v for k, v in inputs.items() if k not in ("finetuned_model", "original_model")}
            m0 = cap.mark()
            out = call_node(cls, inputs)
            r["node_warnings"] = cap.since(m0)[:10]
            r["contract"] = check_outputs(cls, out)
            path = out["result"][0]
            r["lora_path"] = path
            r["report_head"] = out["result"][1].splitlines()[:6]
            r["file"] = lora_file_facts(path)
        except Exception:  # noqa: BLE001
            r["error"] = log_exc(f"{arch} {node_name}")
            r["secs"] = round(time.time() - tn, 1)
            continue
        r["extract_secs"] = round(time.time() - tn, 1)

        # LoraLoaderModelOnly: load_torch_file + load_lora_for_models(model, None, lora, 1.0, 0)
        ta = time.time()
        try:
            m0 = cap.mark()
            with torch.inference_mode():
                lora = comfy.utils.load_torch_file(path, safe_load=True)
                patched_mp, _ = comfy.sd.load_lora_for_models(base_mp, None, lora, 1.0, 0)
            logs = cap.since(m0)
            r["lora_key_not_loaded"] = [m for m in logs if "lora key not loaded" in m]
            r["not_loaded"] = [m for m in logs if m.startswith("NOT LOADED")]
            patched_keys = {k[len("diffusion_model."):] for k in patched_mp.patches if k.startswith("diffusion_model.")}
            r["patched_tensors"] = len(patched_keys)
            r["not_covered"] = sorted(k for k in ref if k not in patched_keys)
            with torch.inference_mode():
                p32 = patched_fp32(patched_mp, list(ref), dev)
            r["fp32"] = score(p32, base_sd, tuned_sd, ref, dev)
            del p32
            r["t_apply"] = round(time.time() - ta, 1)
        except Exception:  # noqa: BLE001
            r["error"] = "apply: " + log_exc(f"{arch} {node_name} apply")
            continue

        # ModelSave: load_models_gpu(force_patch_weights=True) + state_dict_for_saving
        ts = time.time()
        try:
            with torch.inference_mode():
                mm.load_models_gpu([patched_mp], force_patch_weights=True)
                saved = strip_prefix(patched_mp.model.state_dict_for_saving(None, None, None), set(tuned_sd))
                r["saved"] = score(saved, base_sd, tuned_sd, ref, dev)
                r["saved_dtype"] = "+".join(sorted({str(saved[k].dtype).replace("torch.", "") for k in ref if k in saved}))
                del saved
        except Exception:  # noqa: BLE001
            r["saved_error"] = log_exc(f"{arch} {node_name} ModelSave path")
        finally:
            try:
                mm.unload_all_models()
                mm.soft_empty_cache(True)
            except Exception:  # noqa: BLE001
                log_exc("unload")
        del patched_mp, lora
        gc.collect()
        r["t_save"] = round(time.time() - ts, 1)

        # LoraValidate on the file (informational)
        if not a.no_validate and "LoraValidate" in nodes_map:
            tv = time.time()
            try:
                vcls = nodes_map["LoraValidate"]
                uid_counter[0] += 1
                vin = node_inputs(vcls, {}, unique_id=str(uid_counter[0]))
                vin.update(finetuned_model=tuned_mp, original_model=base_mp, lora_path=path)
                vout = call_node(vcls, vin)
                r["validate_contract"] = check_outputs(vcls, vout)
                r["validate_head"] = vout["result"][0].splitlines()[:8]
                r["validate_ok"] = not r["validate_contract"]
            except Exception:  # noqa: BLE001
                r["validate_ok"] = False
                r["validate_error"] = log_exc(f"{arch} LoraValidate on {node_name}")
            r["validate_secs"] = round(time.time() - tv, 1)

        f = r["fp32"]
        reasons = []
        if r["contract"]:
            reasons.append("contract: " + "; ".join(r["contract"]))
        if r["not_covered"]:
            reasons.append(f"{len(r['not_covered'])} changed tensors not covered")
        if r["lora_key_not_loaded"] or r["not_loaded"]:
            reasons.append(f"{len(r['lora_key_not_loaded']) + len(r['not_loaded'])} lora keys not loaded")
        if f["missing"]:
            reasons.append(f"{len(f['missing'])} tensors missing from the patched model")
        if f["median_ratio"] is None or f["median_ratio"] > MAX_MEDIAN_RATIO:
            reasons.append(f"median ratio {fmt(f['median_ratio'])} > {MAX_MEDIAN_RATIO}")
        if f["full_max_rel_err"] is not None and f["full_max_rel_err"] > MAX_FULL_REL_ERR:
            reasons.append(f"whole-tensor diff rel err {f['full_max_rel_err']:.2e} ({f['full_worst_key']})")
        if f["exact_max_rel_err"] is not None and f["exact_max_rel_err"] > MAX_FULL_REL_ERR:
            reasons.append(f"low-rank-exact tensor rel err {f['exact_max_rel_err']:.2e}")
        if "saved_error" in r:
            reasons.append("ModelSave path raised")
        r["fail_reasons"] = reasons
        r["ok"] = not reasons
        r["secs"] = round(time.time() - tn, 1)

    v1p, v2p = (res["nodes"].get(t, {}).get("lora_path") for t in ("v1", "v2"))
    if v1p and v2p:
        try:
            res["v1_vs_v2"] = compare_lora_files(v1p, v2p)
        except Exception:  # noqa: BLE001
            res["v1_vs_v2"] = "FAIL " + log_exc("v1 vs v2 files")
    del mps, base_mp, tuned_mp, base_sd, tuned_sd
    try:
        mm.unload_all_models()
        mm.soft_empty_cache(True)
    except Exception:  # noqa: BLE001
        log_exc("unload")
    gc.collect()
    if dev.type == "cuda":   # what stays allocated once this architecture's models are gone
        res["cuda_alloc_mib_after"] = round(torch.cuda.memory_allocated(dev) / 2**20, 1)
    res["secs"] = round(time.time() - t0, 1)
    return res


def arch_line(res: dict) -> str:
    parts = [f"ARCH {res['arch']:<9} class={res.get('model_class', '?')} dtype={res.get('model_dtype', '?')} "
             f"changed={res.get('changed', '?')}/{res.get('tensors', '?')}"]
    if res["errors"]:
        parts.append("ERROR " + " | ".join(res["errors"]))
    odd = []   # the weights ComfyUI holds should be the files' values, every key loaded
    if res.get("held_differs"):
        odd.append(f"{res['held_differs']} tensors held by ComfyUI ({res.get('model_dtype')}) differ from the fp16 files")
    if res.get("not_in_model"):
        odd.append(f"file keys not in the model: {res['not_in_model'][:3]}")
    if res.get("load_warnings"):
        odd.append(f"load warnings: {res['load_warnings'][:2]}")
    if odd:
        parts.append("NOTE " + "; ".join(odd))
    for tag in ("v1", "v2"):
        r = res["nodes"].get(tag)
        if r is None:
            continue
        if "error" in r:
            parts.append(f"{tag}=FAIL exception: {r['error']}")
            continue
        f, s = r.get("fp32", {}), r.get("saved", {})
        parts.append(
            f"{tag}={'ok' if r['ok'] else 'FAIL'} med_ratio={fmt(f.get('median_ratio'))} "
            f"max_ratio={fmt(f.get('max_ratio'))} full_max_err={fmt(f.get('full_max_rel_err'), 1) if f.get('full_max_rel_err') is None else format(f['full_max_rel_err'], '.1e')} "
            f"not_covered={len(r.get('not_covered', []))} key_not_loaded={len(r.get('lora_key_not_loaded', [])) + len(r.get('not_loaded', []))} "
            f"saved_med={fmt(s.get('median_ratio'))}({r.get('saved_dtype', '?')}) "
            f"validate={'na' if 'validate_ok' not in r else ('ok' if r['validate_ok'] else 'FAIL')} "
            f"t={r.get('extract_secs', '?')}s"
            + (f" [{'; '.join(r['fail_reasons'])}]" if r.get("fail_reasons") else ""))
    ph = [f"load={res.get('t_load')}", f"ref={res.get('t_reference')}"]
    for tag in ("v1", "v2"):
        r = res["nodes"].get(tag) or {}
        ph.append(f"{tag}:ext={r.get('extract_secs')},apply={r.get('t_apply')},save={r.get('t_save')},val={r.get('validate_secs')}")
    if "cuda_alloc_mib_after" in res:
        parts.append(f"cuda_alloc_after={res['cuda_alloc_mib_after']}MiB")
    if "v1_vs_v2" in res:
        parts.append(f"v1_vs_v2_files={res['v1_vs_v2']}")
    if "v2_repeat" in res:
        parts.append(f"v2_again={res['v2_repeat']}")
    parts.append(f"secs={res.get('secs')} ({' '.join(ph)})")
    return " | ".join(parts)


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--comfy-root", default=os.environ.get("COMFYUI_CARRY_ROOT", os.path.join(REPO, ".carry-comfy", "comfyui")))
    ap.add_argument("--models-dir", default=os.path.expanduser("~/comfyui/models/diffusion_models"))
    ap.add_argument("--pack", default=os.environ.get("PACK_DIR", REPO),
                    help="the pack's folder; imported as lora_extract through a symlink (skipped when "
                         "lora_extract already imports from PYTHONPATH)")
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--work", default=None, help="ComfyUI base directory (output/, temp/); default: a new temp dir")
    ap.add_argument("--log", default=None, help="detailed log (default: <work>/comfy_inprocess.log)")
    ap.add_argument("--json", default=None, help="full results as JSON")
    ap.add_argument("--expect-digests", default=None, help="JSON {file: digest}; compare the model files")
    ap.add_argument("--reference", choices=["held", "files"], default="held",
                    help="what base/tuned are: the weights ComfyUI holds (default; its dtype choice) or the files' values")
    ap.add_argument("--unet-dtype", choices=["default", "bf16", "fp16", "fp32"], default="default",
                    help="ComfyUI's --bf16-unet/--fp16-unet/--fp32-unet (default: ComfyUI's own choice)")
    ap.add_argument("--no-validate", action="store_true", help="skip LoraValidate")
    ap.add_argument("--no-repeat", action="store_true", help="skip the second LoraExtractV2 run (resident-cache path)")
    ap.add_argument("--no-cuda-malloc", action="store_true", help="like ComfyUI's --disable-cuda-malloc")
    ap.add_argument("--stack-dump-after", type=float, default=90.0,
                    help="seconds after which a node call still running gets all stacks dumped to the log")
    ap.add_argument("--print-digests", metavar="DIR", help="print content digests of DIR's tiny models as JSON and exit")
    a = ap.parse_args()

    if a.print_digests:
        print(json.dumps({n: content_digest(p) for n, p in model_files(a.print_digests, ARCHS).items()}, indent=1))
        return 0

    t_start = time.time()
    work = a.work or tempfile.mkdtemp(prefix="comfy_inproc_")
    os.makedirs(work, exist_ok=True)
    log_path = a.log or os.path.join(work, "comfy_inprocess.log")
    cap = setup_logging(log_path)
    # stacks of all threads into the log: for a node call that runs long, and when killed by timeout(1)
    import faulthandler
    import signal
    _STACKS["file"] = open(log_path, "a")  # noqa: SIM115  (kept open for faulthandler)
    _STACKS["after"] = a.stack_dump_after
    faulthandler.register(signal.SIGTERM, file=_STACKS["file"], all_threads=True, chain=True)
    say(f"START device={a.device} comfy_root={a.comfy_root} models={a.models_dir} work={work} log={log_path}")
    log.info("criteria: median(rel_err/optimal rank-%d err) <= %s over matrix tensors; whole-tensor diffs "
             "rel err <= %s; no changed tensor uncovered; no 'lora key not loaded'/'NOT LOADED'; outputs match "
             "RETURN_TYPES; ModelSave path runs", a.rank, MAX_MEDIAN_RATIO, MAX_FULL_REL_ERR)
    results = {"args": vars(a), "archs": [], "env": {}}
    total = 2 * len(a.archs)

    def finish(ok: int, extra: str) -> int:
        line = f"SUMMARY ok={ok}/{total} {extra} secs={time.time() - t_start:.0f}"
        say(line)
        results["summary"] = line
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        return 0 if ok == total else 1

    missing = [n for n, p in model_files(a.models_dir, a.archs).items() if not os.path.isfile(p)]
    if missing:
        say(f"ERROR model files missing in {a.models_dir}: {missing}")
        return finish(0, "error=models_missing")
    try:
        info, progress_calls = setup_comfy(a, work)
    except Exception:  # noqa: BLE001
        say("ERROR ComfyUI set-up: " + log_exc("ComfyUI set-up"))
        return finish(0, "error=comfy_setup")
    results["env"].update(info)
    say("ENV " + " ".join(f"{k}={v}" for k, v in info.items()))
    if a.expect_digests:   # after the set-up: torch must not be imported before cuda_malloc
        try:
            with open(a.expect_digests) as f:
                want = json.load(f)
            got = {n: content_digest(p) for n, p in model_files(a.models_dir, a.archs).items()}
            same = [n for n in got if want.get(n) == got[n]]
            results["env"]["model_digests"] = {"match": len(same), "of": len(got),
                                               "differ": sorted(set(got) - set(same))}
            say(f"MODELS content digests equal to the local ones: {len(same)}/{len(got)}"
                + (f" (differ: {sorted(set(got) - set(same))})" if len(same) != len(got) else ""))
        except Exception:  # noqa: BLE001
            say("MODELS digest check raised: " + log_exc("digests"))

    progress_texts: list = []
    results["env"]["prompt_server"] = install_prompt_server_stub(progress_texts)

    # the pack, as `lora_extract`
    try:
        try:
            import lora_extract  # noqa: F401
        except ImportError:
            link_dir = os.path.join(work, "packlink")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "lora_extract")
            if not os.path.islink(link):
                os.symlink(os.path.abspath(a.pack), link)
            sys.path.insert(0, link_dir)
            import lora_extract  # noqa: F401
        import lora_extract.nodes
        nodes_map = dict(lora_extract.nodes.NODE_CLASS_MAPPINGS)
        results["env"]["pack"] = os.path.realpath(os.path.dirname(lora_extract.__file__))
        # what /object_info does for every node: INPUT_TYPES() must work
        bad_info = []
        for name, cls in nodes_map.items():
            try:
                cls.INPUT_TYPES()
            except Exception:  # noqa: BLE001
                bad_info.append(f"{name}: {log_exc(name + '.INPUT_TYPES')}")
        say(f"PACK {results['env']['pack']} nodes={sorted(nodes_map)} input_types_errors={len(bad_info)}")
        results["env"]["input_types_errors"] = bad_info
    except Exception:  # noqa: BLE001
        say("ERROR importing the pack: " + log_exc("pack import"))
        return finish(0, "error=pack_import")

    import comfy.model_management as mm
    dev = mm.get_torch_device()
    uid = [0]
    ok = 0
    failures = []
    validate_ok = 0
    repeat_same_n = 0
    v1v2_n = 0
    for arch in a.archs:
        try:
            res = run_arch(arch, a, cap, nodes_map, dev, uid)
        except Exception:  # noqa: BLE001
            res = {"arch": arch, "nodes": {}, "errors": ["harness: " + log_exc(f"{arch} harness")]}
        results["archs"].append(res)
        say(arch_line(res))
        for tag in ("v1", "v2"):
            r = res["nodes"].get(tag)
            if r and r.get("ok"):
                ok += 1
            else:
                failures.append(f"{arch}/{tag}")
            if r and r.get("validate_ok"):
                validate_ok += 1
        if str(res.get("v2_repeat", "")).startswith(("same", "close")):
            repeat_same_n += 1
        if str(res.get("v1_vs_v2", "")).startswith(("same", "close")):
            v1v2_n += 1
        if a.json:   # keep partial results if a later architecture hangs
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    results["env"]["progress_hook_calls"] = progress_calls["n"]
    results["env"]["progress_texts"] = len(progress_texts)
    results["env"]["progress_text_sample"] = progress_texts[:3]
    peak = ""
    try:
        import torch
        if dev.type == "cuda":
            peak = f" peak_alloc_mib={torch.cuda.max_memory_allocated(dev) / 2**20:.0f}"
    except Exception:  # noqa: BLE001
        pass
    extra = (f"device={dev} torch={info['torch']} comfyui={info['comfyui']} "
             f"validate_ok={validate_ok}/{total if not a.no_validate else 0} "
             f"v1_vs_v2_files_match={v1v2_n}/{len(a.archs)} "
             f"v2_again_match={repeat_same_n}/{0 if a.no_repeat else len(a.archs)} "
             f"progress_hook_calls={progress_calls['n']} progress_texts={len(progress_texts)}{peak} "
             f"failures={','.join(failures) or 'none'}")
    return finish(ok, extra)


if __name__ == "__main__":
    sys.exit(main())
