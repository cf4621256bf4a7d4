#!/usr/bin/env python3
"""Make tiny but real-architecture diffusion models (base + "fine-tuned") for ComfyUI.

The model classes and the detection logic are ComfyUI's own: each architecture is
instantiated from comfy.supported_models.<Class>(unet_config).get_model(), its
state-dict keys/shapes are taken from that instance, weights are filled with a
seeded random init, and the result is checked with comfy.model_detection (the
same path UNETLoader / comfy.sd.load_diffusion_model uses).

The tuned variant is base + per-layer low-rank delta (rank 4..16, geometric
singular-value decay) + small dense noise on EVERY tensor (weights, biases,
norm scales, embeddings).  Ground truth is written to <name>_tuned.truth.json.

Usage (ComfyUI's venv python, since it imports comfy):
  COMFYUI_ROOT=~/comfyui ~/comfyvenv/bin/python make_tiny_models.py \
      [--arch sd15 sd3 flux_like wan21 | all] [--out DIR] [--dtype fp16|bf16|fp32]
      [--seed 0] [--verify]
Default out dir: $COMFYUI_ROOT/models/diffusion_models
"""
import argparse
import json
import logging
import math
import os
import re
import sys
import time
import zlib

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT", os.path.expanduser("~/comfyui"))
sys.path.insert(0, COMFYUI_ROOT)

import comfy.cli_args  # noqa: E402  (parses no argv unless comfy.options enables it)
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management is imported: never touch CUDA
import comfy.model_detection  # noqa: E402
import comfy.supported_models  # noqa: E402

# ---------------------------------------------------------------------------
# Architectures.  Each unet_config is exactly what comfy.model_detection
# .detect_unet_config() returns for the generated state dict (checked below).
# ---------------------------------------------------------------------------
ARCHS = {
    # SD1.5 UNet: model_channels 320 / context_dim 768 / conv proj_in are what
    # supported_models.SD15 requires; depth is cut to 2 levels x 1 res block.
    # 3x3 convs, 1x1 convs (proj_in/out, skip), linear attn, GroupNorm/LayerNorm.
    "sd15": dict(
        cls="SD15",
        unet_config={
            "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 1],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
        },
    ),
    # SD3 MMDiT: hidden = 64*depth, so depth 8 -> 512 wide, 8 joint blocks.
    # Fused qkv linears, adaLN modulation, 2x2 patch conv, pos_embed buffer.
    "sd3": dict(
        cls="SD3",
        unet_config={
            "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 8,
            "input_size": None, "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 512}},
            "num_patches": 1024, "pos_embed_max_size": 32,
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
        },
    ),
    # Flux-layout double/single-stream DiT.  Real Flux has hidden 3072 hard-coded
    # in model_detection (>1 GB even with 1+1 blocks), so this uses the
    # HunyuanVideo detection branch (hidden size read from the weights), which
    # shares Flux's module names: double_blocks.N.img_attn.qkv (fused),
    # img_mod.lin, single_blocks.N.linear1 (fused qkv+mlp), linear2 ...
    # img_in is a Conv3d patch embed (5-D weight).
    "flux_like": dict(
        cls="HunyuanVideo",
        unet_config={
            "image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2],
            "out_channels": 16, "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
            "context_in_dim": 4096, "hidden_size": 512, "mlp_ratio": 4.0, "num_heads": 4,
            "depth": 2, "depth_single_blocks": 4, "theta": 256, "qkv_bias": True,
            "byt5": False, "guidance_embed": True,
        },
        # Keys that newer ComfyUI's detection adds for this branch (HunyuanVideo 1.5 support, seen in
        # 0.33.0, required by its HunyuanVideoParams); used only when the installed ComfyUI asks for them.
        newer_keys={"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False},
    ),
    # Wan 2.1 T2V: dim read from weights, heads = dim/128.  Separate q/k/v/o,
    # RMS q/k norms, (1,6,dim) modulation params, Conv3d patch embedding.
    "wan21": dict(
        cls="WAN21_T2V",
        unet_config={
            "image_model": "wan2.1", "dim": 512, "out_dim": 16, "num_heads": 4,
            "ffn_dim": 2048, "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
            "eps": 1e-6, "in_dim": 16, "model_type": "t2v",
        },
    ),
}
DEFAULT_ARCHS = ["sd15", "sd3", "flux_like", "wan21"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# delta recipe
RANK_MIN, RANK_MAX = 4, 16
DECAY_MIN, DECAY_MAX = 0.70, 0.90     # s_i = s_0 * decay**i
LOWRANK_REL = 0.08                     # ||low-rank delta||_F / ||W||_F
NOISE_REL = 0.03                       # ||dense noise||_F / ||low-rank delta||_F
VECTOR_NOISE_REL = 0.02                # 1-D tensors & other params: noise rms / rms(base)


def gen_for(seed, name, salt):
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{salt}:{name}".encode())) % (2**63))
    return g


_MISSING_ARGS = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)")


def build_model(arch):
    """Instantiate the architecture; returns (cls, model, effective unet_config).  When this
    ComfyUI's model class requires keys the base config lacks and the arch lists them under
    'newer_keys', they are added (so one script serves ComfyUI 0.3.x and newer)."""
    spec = ARCHS[arch]
    cls = getattr(comfy.supported_models, spec["cls"])
    cfg = dict(spec["unet_config"])
    newer = spec.get("newer_keys", {})
    while True:
        try:
            return cls, cls(dict(cfg)).get_model({}, ""), cfg
        except TypeError as e:
            m = _MISSING_ARGS.search(str(e))
            want = re.findall(r"'([^']+)'", m.group(1)) if m else []
            if not want or any(k not in newer or k in cfg for k in want):
                raise
            cfg.update({k: newer[k] for k in want})


def build_shapes(arch):
    cls, model, cfg = build_model(arch)
    dm = model.diffusion_model
    params = dict(dm.named_parameters())
    sd = dm.state_dict()
    out = {}
    for k, v in sd.items():
        kind = "param" if k in params else "buffer"
        out[k] = (tuple(v.shape), kind, v.detach().clone() if kind == "buffer" else None)
    return cls, out, cfg


def init_base(name, shape, kind, buf, seed):
    g = gen_for(seed, name, "base")
    if kind == "buffer" and not name.endswith("pos_embed"):
        return buf.float()  # computed constant buffers: keep as constructed
    if len(shape) >= 2 and name.endswith(".weight"):
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if len(shape) == 1 and (name.endswith(".weight") or name.endswith(".scale")):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)  # norm gains
    return 0.02 * torch.randn(shape, generator=g)  # biases, pos_embed, modulation, ...


def random_orth(n, r, g):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q


def make_delta(name, w, seed):
    """Returns (delta, truth-dict) for one tensor w (float32)."""
    g = gen_for(seed, name, "delta")
    shape = tuple(w.shape)
    if len(shape) >= 2 and name.endswith(".weight"):
        m = shape[0]
        n = math.prod(shape[1:])
        rmax = min(RANK_MIN + int(torch.randint(0, RANK_MAX - RANK_MIN + 1, (1,), generator=g)), m, n)
        decay = DECAY_MIN + (DECAY_MAX - DECAY_MIN) * float(torch.rand((), generator=g))
        s = torch.tensor([decay ** i for i in range(rmax)], dtype=torch.float64)
        wf = float(w.double().norm())
        s = s * (LOWRANK_REL * wf / float(s.norm()))
        U = random_orth(m, rmax, g)
        V = random_orth(n, rmax, g)
        low = (U * s) @ V.T
        noise = torch.randn(m, n, generator=g, dtype=torch.float64)
        noise = noise * (NOISE_REL * float(low.norm()) / float(noise.norm()))
        delta = (low + noise).reshape(shape).float()
        truth = {"shape": list(shape), "kind": "lowrank+noise", "rank": rmax, "decay": round(decay, 4),
                 "singular_values": [float(x) for x in s], "base_frob": wf,
                 "lowrank_frob": float(low.norm()), "noise_frob": float(noise.norm())}
        return delta, truth
    rms = float(w.double().pow(2).mean().sqrt()) if w.numel() else 0.0
    rms = rms if rms > 0 else 1e-3
    delta = VECTOR_NOISE_REL * rms * torch.randn(shape, generator=g)
    return delta, {"shape": list(shape), "kind": "noise", "noise_frob": float(delta.norm()), "base_frob": float(w.norm())}


def verify_detection(path, expect_cls, expect_cfg):
    sd = safetensors.torch.load_file(path)
    got = comfy.model_detection.detect_unet_config(sd, "")
    mc = comfy.model_detection.model_config_from_unet_config(got, sd)
    ok = mc is not None and type(mc) is expect_cls
    diffs = {k: (expect_cfg.get(k), got.get(k)) for k in set(expect_cfg) | set(got)
             if _norm(expect_cfg.get(k)) != _norm(got.get(k))}
    return ok, (type(mc).__name__ if mc is not None else None), diffs


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def verify_load(path, expect_keys):
    """Load through comfy.sd.load_diffusion_model (what UNETLoader calls) and
    check that every tensor lands (no 'unet missing/unexpected' warnings)."""
    import comfy.sd
    msgs = []

    class H(logging.Handler):
        def emit(self, rec):
            msgs.append(rec.getMessage())
    h = H(level=logging.WARNING)
    logging.getLogger().addHandler(h)
    try:
        mp = comfy.sd.load_diffusion_model(path)
    finally:
        logging.getLogger().removeHandler(h)
    loaded = set(mp.model.diffusion_model.state_dict().keys())
    bad = [m for m in msgs if "unet missing" in m or "unet unexpected" in m or "left over" in m]
    return type(mp.model).__name__, sorted(set(expect_keys) - loaded), bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=DEFAULT_ARCHS, help="|".join(ARCHS) + " or all")
    ap.add_argument("--out", default=os.path.join(COMFYUI_ROOT, "models", "diffusion_models"))
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix", default="tiny_")
    ap.add_argument("--verify", action="store_true", help="also load each file through comfy.sd.load_diffusion_model")
    a = ap.parse_args()
    archs = list(ARCHS) if a.arch == ["all"] else a.arch
    os.makedirs(a.out, exist_ok=True)
    dt = DTYPES[a.dtype]
    summary = []
    for arch in archs:
        t0 = time.time()
        cls, shapes, cfg = build_shapes(arch)
        base, tuned, truth = {}, {}, {}
        for k, (shape, kind, buf) in shapes.items():
            w = init_base(k, shape, kind, buf, a.seed)
            base[k] = w.to(dt).contiguous()
            if kind == "buffer" and not k.endswith("pos_embed"):
                tuned[k] = base[k].clone()
                truth[k] = {"shape": list(shape), "kind": "constant_buffer"}
                continue
            d, tr = make_delta(k, w, a.seed)
            tuned[k] = (w + d).to(dt).contiguous()
            # effective delta after rounding to the storage dtype
            eff = tuned[k].float() - base[k].float()
            tr["effective_delta_frob"] = float(eff.double().norm())
            tr["quantization_rel_err"] = float((eff - d).double().norm() / max(float(d.double().norm()), 1e-30))
            truth[k] = tr
        meta = {"tiny_model_arch": arch, "comfy_class": cls.__name__, "seed": str(a.seed),
                "dtype": a.dtype, "unet_config": json.dumps(cfg)}
        names = {}
        for variant, sd in (("base", base), ("tuned", tuned)):
            fn = os.path.join(a.out, f"{a.prefix}{arch}_{variant}.safetensors")
            m = dict(meta, variant=variant)
            if variant == "tuned":
                m["delta_recipe"] = json.dumps({"rank": [RANK_MIN, RANK_MAX], "decay": [DECAY_MIN, DECAY_MAX],
                                                "lowrank_rel": LOWRANK_REL, "noise_rel_to_lowrank": NOISE_REL,
                                                "vector_noise_rel": VECTOR_NOISE_REL})
            safetensors.torch.save_file(sd, fn, metadata=m)
            names[variant] = fn
        with open(os.path.join(a.out, f"{a.prefix}{arch}_tuned.truth.json"), "w") as f:
            json.dump({"arch": arch, "comfy_class": cls.__name__, "dtype": a.dtype, "seed": a.seed,
                       "recipe": {"rank": [RANK_MIN, RANK_MAX], "decay": [DECAY_MIN, DECAY_MAX],
                                  "lowrank_rel": LOWRANK_REL, "noise_rel_to_lowrank": NOISE_REL,
                                  "vector_noise_rel": VECTOR_NOISE_REL},
                       "layers": truth}, f, indent=1)
        ok, got_cls, diffs = verify_detection(names["base"], cls, cfg)
        n_params = sum(math.prod(s) for s, _, _ in shapes.values())
        info = {"arch": arch, "class": cls.__name__, "detected_as": got_cls, "detect_ok": ok,
                "config_diffs": diffs, "tensors": len(shapes), "params": n_params,
                "bytes": os.path.getsize(names["base"]), "files": names, "secs": round(time.time() - t0, 1)}
        if a.verify:
            for variant in ("base", "tuned"):
                mtype, missing, bad = verify_load(names[variant], shapes.keys())
                info[f"load_{variant}"] = {"model_base": mtype, "missing": missing[:10], "warnings": bad[:5]}
        summary.append(info)
        print(json.dumps(info), flush=True)
        if not ok:
            print(f"ERROR: {arch} not detected as {cls.__name__}", file=sys.stderr)
            sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
