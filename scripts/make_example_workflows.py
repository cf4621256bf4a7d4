"""Regenerate ``example_workflows/*.json`` (UI format) and their API twins from short specs.

Run from the repository root after changing a node's inputs: ``python scripts/make_example_workflows.py``.
Widget values are the node's defaults unless a spec overrides them, so regenerated files
follow the current ``INPUT_TYPES``; ``tests/nodes/test_example_workflows.py`` checks the result.
Workflows whose nodes are not registered (yet) are skipped, with a message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ComfyUI stub (as ``folder_paths``) and the repository root (for ``tests.support``), as the
# tests have them through pyproject.toml's pytest ``pythonpath``.
sys.path[:0] = [os.path.join(ROOT, "tests", "comfy_stub"), ROOT]

import folder_paths  # noqa: E402  (the test stub: empty model folders, no ComfyUI needed)

from tests.support.workflow_check import FRONTEND_ONLY, MODE_ACTIVE, MODE_MUTED, load_definitions, ui_to_api  # noqa: E402

OUT = os.path.join(ROOT, "example_workflows")
TUNED, BASE = "tiny_sd15_tuned.safetensors", "tiny_sd15_base.safetensors"


@dataclass
class N:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, object] = field(default_factory=dict)
    title: str | None = None
    mode: int = MODE_ACTIVE
    width: int = 340
    text: str = ""          # Note nodes


def _loader(node_id: int, file: str, title: str, y: int) -> N:
    return N(node_id, "UNETLoader", (0, y), {"unet_name": file, "weight_dtype": "default"}, title, width=320)


def _note(node_id: int, pos: tuple[int, int], text: str, width: int = 320) -> N:
    return N(node_id, "Note", pos, text=text, width=width)


def build_ui(nodes: list[N], links: list[tuple[int, int, int, str]], defs,
             groups: list[dict] | None = None) -> dict:
    """A UI-format (frontend 'Save') workflow; links are (from id, output slot, to id, input name)."""
    by_id = {n.id: n for n in nodes}
    ui_nodes: dict[int, dict] = {}
    for n in nodes:
        if n.type in FRONTEND_ONLY:
            ui_nodes[n.id] = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": [n.width, 120],
                              "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                              "properties": {}, "widgets_values": [n.text], "color": "#432",
                              "bgcolor": "#653"}
            continue
        d = defs[n.type]
        values: list[object] = []
        for w in d.widgets:
            choices = w.type if isinstance(w.type, list) else w.opts.get("fixed", [])
            default = w.opts.get("default", choices[0] if choices else None)
            values.append(n.widgets.get(w.name, default))
            if w.controls:
                values.append("fixed")
        unknown = set(n.widgets) - {w.name for w in d.widgets}
        if unknown:
            raise SystemExit(f"{n.type}: no widget {sorted(unknown)}")
        inputs = []
        for s in d.sockets:
            entry: dict[str, object] = {"name": s.name, "type": s.socket_type, "link": None}
            if s.optional:
                entry["shape"] = 7
            inputs.append(entry)
        outputs = [{"name": name, "type": typ, "links": None, "slot_index": i}
                   for i, (name, typ) in enumerate(d.outputs)]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos),
                "size": [n.width, 46 + 24 * (len(d.widgets) + max(len(inputs), len(outputs)))],
                "flags": {}, "order": 0, "mode": n.mode, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        ui_nodes[n.id] = node
    ui_links = []
    for link_id, (src, slot, dst, name) in enumerate(links, start=1):
        out = ui_nodes[src]["outputs"][slot]
        out["links"] = [*(out["links"] or []), link_id]
        target = next(i for i, inp in enumerate(ui_nodes[dst]["inputs"]) if inp["name"] == name)
        ui_nodes[dst]["inputs"][target]["link"] = link_id
        ui_links.append([link_id, src, slot, dst, target, out["type"]])
    # Execution order as the frontend stores it: a topological order of the graph.
    order: list[int] = []
    pending = {n.id for n in nodes}
    while pending:
        ready = sorted(i for i in pending if all(s not in pending for s, _o, d, _n in links if d == i))
        order.extend(ready)
        pending -= set(ready)
    for i, node_id in enumerate(order):
        ui_nodes[node_id]["order"] = i
    del by_id
    return {"last_node_id": max(ui_nodes), "last_link_id": len(ui_links),
            "nodes": [ui_nodes[n.id] for n in nodes], "links": ui_links, "groups": groups or [],
            "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [40, 40]}}, "version": 0.4}


def extract_then_validate() -> tuple[list[N], list, list]:
    nodes = [
        _loader(1, TUNED, "fine-tuned model", 0),
        _loader(2, BASE, "original model", 160),
        N(3, "LoraExtract", (380, 0), {"rank": 16}),
        N(4, "LoraValidate", (780, 0), {}, width=420),
        _note(5, (0, 320), "Load the fine-tuned model and the model it was trained from (here the tiny "
              "test models; pick yours). LoRA Extract saves the LoRA and shows its chart; LoRA "
              "Validate applies the saved file to the original model and reports, per layer, how "
              "close original + LoRA comes to the fine-tuned weights (coverage, relative error, "
              "LoRA keys ComfyUI would not load)."),
    ]
    links = [(1, 0, 3, "finetuned_model"), (2, 0, 3, "original_model"), (1, 0, 4, "finetuned_model"),
             (2, 0, 4, "original_model"), (3, 0, 4, "lora_path")]
    return nodes, links, []


def extract_then_apply() -> tuple[list[N], list, list]:
    lora_file = "ComfyUI_extracted_lora_rank_32_fp16_00001_.safetensors"
    nodes = [
        _loader(1, TUNED, "fine-tuned model", 0),
        _loader(2, BASE, "original model", 160),
        N(3, "LoraExtract", (380, 0), {"rank": 32, "save_to": "models/loras"}),
        _note(4, (0, 320), "Step 1: queue. The LoRA is saved straight into models/loras. Step 2: press "
              "R to refresh the file lists, pick the new file in 'Load LoRA', select the muted nodes "
              "of step 2 and press Ctrl+M to unmute them, pick your text encoder and VAE, mute LoRA "
              "Extract, and queue again: the original model + LoRA generates like the fine-tune."),
        N(5, "LoraLoaderModelOnly", (380, 520), {"lora_name": lora_file, "strength_model": 1.0},
          mode=MODE_MUTED),
        N(6, "CLIPLoader", (0, 520), {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"},
          mode=MODE_MUTED),
        N(7, "CLIPTextEncode", (0, 680), {"text": "a photo of a cat"}, "positive", MODE_MUTED),
        N(8, "CLIPTextEncode", (0, 880), {"text": "blurry"}, "negative", MODE_MUTED),
        N(9, "EmptyLatentImage", (380, 680), {"width": 512, "height": 512, "batch_size": 1},
          mode=MODE_MUTED),
        N(10, "KSampler", (780, 520), {"seed": 0, "steps": 20, "cfg": 7.0}, mode=MODE_MUTED),
        N(11, "VAELoader", (780, 880), {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"},
          mode=MODE_MUTED),
        N(12, "VAEDecode", (1160, 520), {}, mode=MODE_MUTED, width=220),
        N(13, "SaveImage", (1160, 640), {"filename_prefix": "with_extracted_lora"}, mode=MODE_MUTED),
    ]
    links = [(1, 0, 3, "finetuned_model"), (2, 0, 3, "original_model"), (2, 0, 5, "model"),
             (6, 0, 7, "clip"), (6, 0, 8, "clip"), (5, 0, 10, "model"), (7, 0, 10, "positive"),
             (8, 0, 10, "negative"), (9, 0, 10, "latent_image"), (10, 0, 12, "samples"),
             (11, 0, 12, "vae"), (12, 0, 13, "images")]
    groups = [{"title": "1. extract", "bounding": [-20, -60, 800, 560], "color": "#3f789e",
               "font_size": 24, "flags": {}},
              {"title": "2. generate with the LoRA (unmute after step 1)", "bounding": [-20, 460, 1560, 640],
               "color": "#8A8", "font_size": 24, "flags": {}}]
    return nodes, links, groups


def extract_v2() -> tuple[list[N], list, list]:
    nodes = [
        _loader(1, TUNED, "fine-tuned model", 0),
        _loader(2, BASE, "original model", 160),
        N(3, "LoraExtractV2", (380, 0), {}, width=420),
        N(4, "LoraValidate", (860, 0), {}, width=420),
        _note(5, (0, 320), "LoRA Extract V2: the same extraction, with block swapping and batched SVD on "
              "the GPU for large models. LoRA Validate checks the file it saved."),
    ]
    links = [(1, 0, 3, "finetuned_model"), (2, 0, 3, "original_model"), (1, 0, 4, "finetuned_model"),
             (2, 0, 4, "original_model"), (3, 0, 4, "lora_path")]
    return nodes, links, []


def extract_checkpoint_with_clip() -> tuple[list[N], list, list]:
    nodes = [
        N(1, "CheckpointLoaderSimple", (0, 0), {"ckpt_name": "tiny_sd15_clip_tuned.safetensors"},
          "fine-tuned checkpoint", width=320),
        N(2, "CheckpointLoaderSimple", (0, 210), {"ckpt_name": "tiny_sd15_clip_base.safetensors"},
          "original checkpoint", width=320),
        N(3, "LoraExtract", (380, 0), {"rank": 16, "text_encoder_rank": 8,
                                       "save_to": "models/loras"}, width=420),
        _note(4, (0, 420), "Extract the UNet and the text encoder of a full fine-tune (e.g. DreamBooth) "
              "into one LoRA: wire MODEL to MODEL and CLIP to CLIP from the two checkpoints. "
              "text_encoder_rank sets the text-encoder rank (0: same as rank). Load the file with "
              "Load LoRA (model and clip); leave the CLIP pair unconnected to extract the UNet only, "
              "or the MODEL pair to extract the text encoder only."),
    ]
    links = [(1, 0, 3, "finetuned_model"), (2, 0, 3, "original_model"),
             (1, 1, 3, "finetuned_clip"), (2, 1, 3, "original_clip")]
    return nodes, links, []


def resize() -> tuple[list[N], list, list]:
    return [N(1, "LoraResize", (0, 0), {"lora_name": "my_lora.safetensors", "unet_name": BASE}, width=420),
            _note(2, (460, 0), "Resize a LoRA from the loras folder (pick it in lora_name) against the "
                  "base model it was made for (unet_name or ckpt_name here, or a MODEL wired into "
                  "'model'). Each score recipe writes one file to output/loras; the report says "
                  "what each kept.")], [], []


def merge() -> tuple[list[N], list, list]:
    return [N(1, "LoraMerge", (0, 0), {"loras": "style.safetensors:0.7\ncharacter.safetensors:0.5",
                                       "score_recipes": "rank=32:fro_ckpt=1,size=64",
                                       "block_weights": "2:output_blocks.*=0.8",
                                       "unet_name": BASE}, width=420),
            _note(2, (460, 0), "Merge LoRAs from the loras folder, one 'name:weight' per line, into one "
                  "LoRA against the base model they were made for. LoKr, LoHa, DoRA and full-difference "
                  "files are converted. Each recipe writes one file to output/loras: rank=32 a fixed "
                  "rank, size=64 the best 64 MiB. block_weights scales parts of one LoRA (here the "
                  "second's output blocks by 0.8).")], [], []


WORKFLOWS = {
    "extract_then_validate": (extract_then_validate, ("LoraExtract", "LoraValidate")),
    "extract_then_apply": (extract_then_apply, ("LoraExtract",)),
    "extract_v2_then_validate": (extract_v2, ("LoraExtractV2", "LoraValidate")),
    "resize_lora": (resize, ("LoraResize",)),
    "merge_loras": (merge, ("LoraMerge",)),
    "extract_checkpoint_with_clip": (extract_checkpoint_with_clip, ("LoraExtract",)),
}


def main() -> int:
    folder_paths._set_base_dir(tempfile.mkdtemp(prefix="lora-extract-wf-"))
    from lora_extract.nodes import NODE_CLASS_MAPPINGS

    model_dirs = [folder_paths.get_folder_paths(f)[0] for f in ("loras", "checkpoints", "diffusion_models")]
    defs = load_definitions(NODE_CLASS_MAPPINGS, model_dirs)
    for name, (spec, needs) in WORKFLOWS.items():
        missing = [n for n in needs if n not in NODE_CLASS_MAPPINGS]
        if missing:
            print(f"skipped {name}: node(s) {', '.join(missing)} not registered")
            continue
        nodes, links, groups = spec()
        ui = build_ui(nodes, links, defs, groups)
        for path, data in ((os.path.join(OUT, f"{name}.json"), ui),
                           (os.path.join(OUT, "api", f"{name}.json"), ui_to_api(ui, defs))):
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2) + "\n")
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
