"""What ComfyUI sends a node is what the node's function takes.

ComfyUI calls a V3 node's ``execute`` with one keyword argument per declared input (required and
optional); hidden inputs (UNIQUE_ID) arrive on the class it runs on, not as arguments. An input
renamed on one side only is a TypeError in the user's queue, and a widget default that differs
from the function's default means the API (which may omit an optional input) and the UI extract
differently. Unit tests that call ``execute(**kwargs)`` directly see neither.
"""

from __future__ import annotations

import inspect

import pytest

from lora_extract.nodes import NODE_CLASS_MAPPINGS
from tests.support.paths import REPO_ROOT

SECTIONS = ("required", "optional")


def _declared(cls) -> dict[str, tuple]:
    types = cls.INPUT_TYPES()
    return {name: spec for section in SECTIONS for name, spec in types.get(section, {}).items()}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_every_declared_input_is_a_parameter_and_back(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    params = list(inspect.signature(cls.execute).parameters)   # a classmethod: no cls
    assert set(_declared(cls)) == set(params)
    assert cls.FUNCTION == "EXECUTE_NORMALIZED"   # ComfyUI runs execute through its wrapper


@pytest.mark.parametrize("name", ["LoraExtract", "LoraExtractV2"])
def test_extraction_nodes_get_their_node_id_for_progress_text(name: str) -> None:
    # ComfyUI fills a hidden input only for the names it knows: UNIQUE_ID is the node's id.
    # (Output nodes also get PROMPT and EXTRA_PNGINFO, which ComfyUI adds to every output node.)
    assert NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["hidden"]["unique_id"] == ("UNIQUE_ID",)


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_widget_defaults_are_the_functions_defaults(name: str) -> None:
    cls = NODE_CLASS_MAPPINGS[name]
    sig = inspect.signature(cls.execute).parameters
    checked = 0
    for key, spec in _declared(cls).items():
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        default = sig[key].default
        if "default" in opts and default is not inspect.Parameter.empty:
            assert opts["default"] == default, (key, opts["default"], default)
            checked += 1
    if name in ("LoraExtract", "LoraExtractV2"):
        assert checked >= 5        # key_style, conv_rank, alpha, save_to, target_size_mb...


def _readme_defaults() -> dict[str, str]:
    """LoraExtract's input table in docs/nodes.md: name -> default as written."""
    import os
    import re

    readme = open(os.path.join(REPO_ROOT, "docs", "nodes.md")).read()
    table = readme[readme.index("| input | default | meaning |"):]
    table = table[: table.index("\n\n")]
    out = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)`( \(opt\.\))?", cells[0])
        if m and cells[1]:
            out[m.group(1)] = cells[1].split(" (")[0].strip("`")
    return out


def test_readme_table_states_the_node_defaults() -> None:
    """Every default docs/nodes.md's LoraExtract table states is the widget's default (and the
    widgets it lists all carry one), so the docs and a fresh node agree."""
    declared = _declared(NODE_CLASS_MAPPINGS["LoraExtract"])
    documented = _readme_defaults()
    assert len(documented) >= 12
    for name, text in documented.items():
        spec = declared[name]
        default = spec[1]["default"]
        shown = str(default).lower() if isinstance(default, bool) else f"{default:g}" \
            if isinstance(default, float) else str(default)
        assert shown == text, (name, default, text)


# --- what the user reads and can set in ComfyUI ---------------------------------------------

# Inputs with no tooltip: none; a new one fails.
NO_TOOLTIP: set[tuple[str, str]] = set()


def _visible(cls) -> dict[str, tuple]:
    """The inputs shown on the node (not the hidden ones ComfyUI fills in)."""
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def test_every_input_output_and_node_explains_itself_in_sentences() -> None:
    missing = set()
    for name, cls in NODE_CLASS_MAPPINGS.items():
        texts = [cls.DESCRIPTION, *cls.OUTPUT_TOOLTIPS]
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        for key, spec in _visible(cls).items():
            tip = _options(spec).get("tooltip")
            if tip is None:
                missing.add((name, key))
            else:
                texts.append(tip)
        for text in texts:   # whole sentences (or a closing example): nothing cut off or added
            ending = text.endswith(".") or text.rsplit(" ", 1)[0].endswith(". E.g.")
            assert text and text == text.strip() and ending and "  " not in text, (name, text)
    assert missing == NO_TOOLTIP


# Key facts of each tooltip of the extraction nodes, as the user reads them; multi-part texts are
# checked across each join so no part can go missing or be mangled.
EXTRACTION_TOOLTIPS = {
    "filename_prefix": ["File name prefix, relative to the output folder (sub-folders allowed, "
                        "no '..' or absolute paths)."],
    "rank": ["LoRA rank for 'standard'; the rank cap for adaptive types."],
    "lora_type": ["standard: fixed rank.", "full: store the whole difference.",
                  "adaptive_*: rank per layer from the spectrum and adaptive_param (capped by rank)."],
    "algorithm": ["svd_linalg: exact SVD.", "randomized SVD, much faster, error within a fraction of a "
                  "percent of optimal; works with every lora_type."],
    "lowrank_iters": ["Power iterations of svd_lowrank: more is slower and more accurate."],
    "output_dtype": ["Data type of the saved LoRA."],
    "bias_diff": ["bias and other non-matrix differences (norms, pos_embed, modulation)."],
    "adaptive_param": ["adaptive_ratio: keep sigma > p*sigma_max.", "adaptive_quantile: share of the sum "
                       "of sigma.", "adaptive_energy: share of sum sigma^2.", "adaptive_fro: share of ||dW||."],
    "clamp_quantile": ["Clip outliers only: in each rank component, entries of up and of down beyond 2x "
                       "the 0.99 quantile of that vector's own absolute values.", "almost no added error."],
    "finetuned_model": ["the LoRA will hold what it changed. Optional when a CLIP pair is connected."],
    "original_model": ["The base model the fine-tune started from."],
    "finetuned_clip": ["(CLIP output of Load Checkpoint / Load CLIP). Its changes go into the same "
                       "file, under the keys LoraLoader applies to the CLIP."],
    "original_clip": ["started from (same type as finetuned_clip)."],
    "text_encoder_rank": ["Rank (cap) for text-encoder layers; 0 = same as rank."],
    "conv_rank": ["Rank (cap) for conv layers; 0 = same as rank."],
    "alpha": ["0 = equal to the rank (scale 1). The factors are rescaled so strength 1 reproduces "
              "the difference."],
    "key_style": ["auto: diffusers for a diffusers-named model, else comfy. comfy: diffusion_model.* and "
                  "text_encoders.* keys. kohya: lora_unet_* and lora_te_* (SDXL: lora_te1_/lora_te2_) "
                  "keys and ss_* metadata. diffusers: PEFT keys (transformer.* / unet.* / "
                  "text_encoder.*, lora_A/lora_B) for diffusers-named models."],
    "save_to": ["output: ComfyUI's output folder. models/loras: LoraLoader lists the file at once."],
    "target_size_mb": ["0 = off.", "fit this many MiB: ranks are allocated across layers (rank / "
                       "conv_rank are the caps) for the least total error; lora_type must be "
                       "standard. The report shows the error against size to pick a value."],
    "size_objective": ["With target_size_mb only. mean: the least average layer error. worst: the least "
                       "worst-layer error; every layer brought to one error level, so none is left at "
                       "rank 1 while others get many."],
    "dora": ["off: plain LoRA.", "a float32 magnitude per output or input channel (dora_scale) that "
             "ComfyUI's loader uses to rebuild the fine-tuned weight", "The report compares each "
             "layer with plain LoRA in the same bytes. Not with target_size_mb or full."],
    "layer_preset": ["attention: attention projections.", "no_embed_head_norm: everything but "
                     "embeddings, output heads and norms."],
    "include": ["separated by ';'", "re:REGEX searched in it"],
    "exclude": ["same syntax as include"],
    "min_change_rel": ["||dW||/||W|| is below this (0 = off)", "noise floor"],
    "min_change_abs": ["||dW|| (Frobenius norm) is below this (0 = off)"],
    "new_tensors": ["Parameters only the fine-tuned model has.", "(whatever the strength)",
                    "skip: left out."],
}
V2_TOOLTIPS = {
    "vram_usage_mode": ["conservative ~50% (one layer at a time, nothing kept), balanced ~75%, "
                        "aggressive ~90%, maximum ~95% (every block that fits stays). Results are "
                        "identical in every mode."],
    "blocks_in_gpu": ["kept on the GPU for the session (middle, output, input, then others), so a "
                      "second extraction from the same models does not move them again."],
    "batch_size": ["same-shaped layers share one batched SVD on the GPU (no gain on a CPU)."],
    "prefetch_ahead": ["read and transferred in the background while the current one is decomposed."],
    "memory_threshold": ["When used VRAM passes this share, kept blocks are offloaded and batches "
                         "made smaller."],
    "debug_mode": ["the memory log (budget, blocks kept, per-batch time and VRAM, threshold events) "
                   "to the report."],
}


@pytest.mark.parametrize("name", ["LoraExtract", "LoraExtractV2"])
def test_extraction_tooltips_state_what_each_input_does(name: str) -> None:
    expected = dict(EXTRACTION_TOOLTIPS, **(V2_TOOLTIPS if name == "LoraExtractV2" else {}))
    tips = {k: _options(spec).get("tooltip", "") for k, spec in _visible(NODE_CLASS_MAPPINGS[name]).items()}
    assert set(tips) == set(expected)
    for key, phrases in expected.items():
        for phrase in phrases:
            assert phrase in tips[key], (key, phrase, tips[key])


def test_extraction_node_descriptions_and_outputs() -> None:
    v1, v2 = NODE_CLASS_MAPPINGS["LoraExtract"], NODE_CLASS_MAPPINGS["LoraExtractV2"]
    assert "between a fine-tuned and an original model as a LoRA file (SVD per layer), with a " \
           "per-layer report of ranks and errors." in v1.DESCRIPTION
    assert "(identical ranks and factors), streaming layers to the GPU in batches with background " \
           "read-ahead and keeping model blocks resident between runs. Measured speed: " \
           "docs/performance.md in the pack." in v2.DESCRIPTION
    chart = ("Chart: rank and relative error per layer by block, and the spectra of the largest "
             "layers with the cut marked.")
    assert tuple(v1.OUTPUT_TOOLTIPS) == ("Full path of the saved LoRA file.", "Per-layer extraction summary.", chart)
    assert tuple(v2.OUTPUT_TOOLTIPS) == ("Full path of the saved LoRA file.",
                                  "Per-layer extraction summary (plus the memory log with debug_mode).",
                                  chart)


# (min, max, step) of every numeric widget: the range the user can pick from, and the grid
# ComfyUI's arrows and rounding move on (whole ranks and MiB, alpha in halves, shares in 1%).
NUMERIC_WIDGETS = {
    "LoraExtract": {"rank": (1, 4096, 1), "lowrank_iters": (1, 100, 1), "adaptive_param": (0.0, 1.0, 0.01),
                    "text_encoder_rank": (0, 4096, 1), "conv_rank": (0, 4096, 1),
                    "alpha": (0.0, 4096.0, 0.5), "target_size_mb": (0.0, 1048576.0, 1.0),
                    "min_change_rel": (0.0, 1.0, 0.0001), "min_change_abs": (0.0, 1e6, 0.001)},
    "LoraLoadComplete": {"strength_model": (-100.0, 100.0, 0.01), "strength_clip": (-100.0, 100.0, 0.01)},
}
NUMERIC_WIDGETS["LoraExtractV2"] = {
    **NUMERIC_WIDGETS["LoraExtract"], "blocks_in_gpu": (0, 40, 1), "batch_size": (1, 8, 1),
    "prefetch_ahead": (0, 10, 1), "memory_threshold": (0.5, 0.95, 0.01)}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_numeric_widget_ranges_and_steps(name: str) -> None:
    numeric = {k: spec for k, spec in _visible(NODE_CLASS_MAPPINGS[name]).items() if spec[0] in ("INT", "FLOAT")}
    shown = {k: (opts["min"], opts["max"], opts["step"]) for k, spec in numeric.items()
             for opts in [_options(spec)]}
    assert shown == NUMERIC_WIDGETS.get(name, {})
    for k, spec in numeric.items():   # INT widgets get ints, FLOAT widgets floats
        assert all(isinstance(v, int if spec[0] == "INT" else float) for v in shown[k]), k


WIDGET_TYPES = {"STRING": "str", "INT": "int", "FLOAT": "float", "BOOLEAN": "bool"}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_each_widget_sends_the_type_the_function_takes(name: str) -> None:
    # A widget of another type (or an unknown one, which ComfyUI shows as an input socket) would
    # hand the function a value it does not expect; choice lists send the chosen string.
    cls = NODE_CLASS_MAPPINGS[name]
    params = inspect.signature(cls.execute).parameters
    for key, spec in _visible(cls).items():
        kind = spec[0]
        if kind == "COMBO":
            assert isinstance(_options(spec)["options"], list), key
            assert params[key].annotation == "str", key
        elif kind in ("MODEL", "CLIP"):
            assert params[key].annotation is inspect.Parameter.empty, key
        else:
            assert params[key].annotation == WIDGET_TYPES[kind], (key, kind)


@pytest.mark.parametrize("name", ["LoraExtract", "LoraExtractV2"])
def test_extraction_nodes_output_path_report_and_a_chart_image(name: str) -> None:
    # The chart output must be an IMAGE, or ComfyUI refuses a link to Preview/Save Image.
    cls = NODE_CLASS_MAPPINGS[name]
    assert tuple(cls.RETURN_TYPES) == ("STRING", "STRING", "IMAGE")
    assert tuple(cls.RETURN_NAMES) == ("lora_path", "report", "chart")
