"""Bad LoRA files given to the resizer: each is one clear error naming the file and the layer.

Missing up or down halves, mismatched or zero ranks, a broken alpha, lying headers, pickles with
code; and output names that can never be paths, whatever the LoRA's name or metadata says.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import lora_extract.resize.lora_file as lora_file
import lora_extract.resize.output as resize_output
import lora_extract.resize.recipe as recipe_mod
from lora_extract.extract import ExtractionInputError

P = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _write(tmp_path, tensors: dict[str, torch.Tensor], name: str = "bad.safetensors",
           metadata: dict[str, str] | None = None) -> str:
    p = str(tmp_path / name)
    save_file(tensors, p, metadata=metadata)
    return p


def _good_layer(prefix: str = P, r: int = 4) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_up.weight": torch.randn(8, r), f"{prefix}.lora_down.weight": torch.randn(r, 8),
            f"{prefix}.alpha": torch.tensor(float(r))}


@pytest.mark.parametrize("drop,named", [
    (f"{P}.lora_down.weight", f"{P}.lora_up.weight"),
    (f"{P}.lora_up.weight", f"{P}.lora_down.weight"),
], ids=["missing down half", "missing up half"])
def test_missing_half_names_the_layer(tmp_path, drop: str, named: str) -> None:
    tensors = {**_good_layer(), **_good_layer("lora_unet_mid_block_attentions_0_proj_out")}
    del tensors[drop]
    path = _write(tmp_path, tensors)
    with pytest.raises(ExtractionInputError) as info:
        lora_file.read_lora_file(path)
    assert path in str(info.value) and named in str(info.value)


@pytest.mark.parametrize("up_shape,down_shape", [
    ((8, 4), (2, 8)),          # ranks 4 and 2
    ((8, 4, 1, 1), (3, 8, 3, 3)),
    ((8, 0), (0, 8)),          # zero rank
    ((8, 4, 3, 3), (4, 8, 3, 3)),  # up must be [out, r, 1, 1]
    ((8,), (4, 8)),            # not a matrix
], ids=["linear ranks differ", "conv ranks differ", "zero rank", "conv up kernel", "1-d up"])
def test_bad_factor_shapes_are_refused(tmp_path, up_shape, down_shape) -> None:
    path = _write(tmp_path, {f"{P}.lora_up.weight": torch.zeros(up_shape),
                             f"{P}.lora_down.weight": torch.zeros(down_shape),
                             f"{P}.alpha": torch.tensor(1.0)})
    with pytest.raises(ExtractionInputError) as info:
        lora_file.read_lora_file(path)
    msg = str(info.value)
    assert path in msg and P in msg and str(list(up_shape)) in msg and str(list(down_shape)) in msg


@pytest.mark.parametrize("alpha", [torch.tensor(float("nan")), torch.tensor(float("inf")), torch.ones(2)],
                         ids=["nan", "inf", "not a scalar"])
def test_broken_alpha_is_refused(tmp_path, alpha: torch.Tensor) -> None:
    tensors = _good_layer()
    tensors[f"{P}.alpha"] = alpha
    path = _write(tmp_path, tensors)
    with pytest.raises(ExtractionInputError, match=rf"{P}\.alpha"):
        lora_file.read_lora_file(path)


def test_lying_header_and_pickle_with_code_are_refused(tmp_path) -> None:
    import json
    import struct

    header = json.dumps({f"{P}.lora_up.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}})
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    with pytest.raises(ExtractionInputError, match="truncated or corrupt"):
        lora_file.read_lora_file(str(lying))

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / "evil.pt"
    torch.save({**_good_layer(), "x": Payload()}, str(evil))
    with pytest.raises(ExtractionInputError, match="refused to load this pickle"):
        lora_file.read_lora_file(str(evil))
    assert not marker.exists()


HOSTILE_NAMES = ["../../escaped", "/etc/passwd", "..", ".", "a/../../b", "..\\..\\win", "C:\\x",
                 "nul\x00byte", "  ", "con:stream"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n) for n in HOSTILE_NAMES])
def test_output_names_are_plain_file_names(tmp_path, name: str) -> None:
    recipe = recipe_mod.parse_recipes(recipe_mod.DEFAULT_RECIPES)[0]
    file_name = resize_output.output_file_name(name, recipe, -3.5)
    assert "/" not in file_name and "\\" not in file_name and "\x00" not in file_name
    assert file_name not in ("", ".", "..") and not file_name.startswith(".")
    folder = str(tmp_path)
    full = os.path.realpath(os.path.join(folder, file_name))
    assert os.path.dirname(full) == os.path.realpath(folder)


def test_names_in_lora_metadata_are_not_used(tmp_path) -> None:
    hostile = {"ss_output_name": "../../escaped", "modelspec.title": "/tmp/escaped", "name": "..\\x"}
    path = _write(tmp_path, _good_layer(), name="my_lora.safetensors", metadata=hostile)
    lora = lora_file.read_lora_file(path)
    assert lora.name == "my_lora"  # from the file name, never from metadata
    recipe = recipe_mod.parse_recipes(recipe_mod.DEFAULT_RECIPES)[0]
    assert resize_output.output_file_name(lora.name, recipe, -3.5).startswith("my_lora_")


@pytest.mark.parametrize("case", ["missing down half", "ranks differ", "zero rank", "lying header"])
def test_bad_lora_through_resize_cli_exits_2_without_output(tmp_path, capsys, case: str) -> None:
    from lora_extract.cli import main

    ckpt = _write(tmp_path, {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8)},
                  name="base.safetensors")
    tensors = _good_layer()
    if case == "missing down half":
        del tensors[f"{P}.lora_down.weight"]
    elif case == "ranks differ":
        tensors[f"{P}.lora_down.weight"] = torch.randn(3, 8)
    elif case == "zero rank":
        tensors[f"{P}.lora_up.weight"], tensors[f"{P}.lora_down.weight"] = torch.zeros(8, 0), torch.zeros(0, 8)
    lora = _write(tmp_path, tensors, name="lora.safetensors")
    if case == "lying header":
        with open(lora, "r+b") as f:
            f.truncate(os.path.getsize(lora) - 8)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["resize", ckpt, lora, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "lora.safetensors" in err
    assert os.listdir(out) == []


# --- merge specs and score recipes: the whole message is what the user reads ---------------

def _resize_cli(tmp_path, capsys, *args: str) -> tuple[int, str]:
    from lora_extract.cli import main

    ckpt = _write(tmp_path, {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8)},
                  name="base.safetensors")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc = main(["resize", ckpt, *args, "-o", str(out)])
    err = capsys.readouterr().err
    assert os.listdir(out) == [] and err.count("\n") == 1, err
    return rc, err.strip()


@pytest.mark.parametrize("spec,message", [
    ("  ", "empty LoRA name; give a file, or 'a:0.7,b:0.3' to merge."),
    ("a.safetensors,,b.safetensors",
     "merge spec 'a.safetensors,,b.safetensors': member '' has no file name; write 'a:0.7,b:0.3'."),
    ("a.safetensors:0.5, ", "merge spec 'a.safetensors:0.5, ': member '' has no file name; write 'a:0.7,b:0.3'."),
    ("a.safetensors:1e999", "merge spec 'a.safetensors:1e999': weight of 'a.safetensors:1e999' is not finite."),
], ids=["empty", "empty member", "trailing comma", "infinite weight"])
def test_bad_merge_specs_are_one_exact_error(spec: str, message: str) -> None:
    from lora_extract.resize.merge import parse_lora_spec

    with pytest.raises(ExtractionInputError) as info:
        parse_lora_spec(spec)
    assert str(info.value) == message


def test_missing_merge_member_is_named_and_exits_2(tmp_path, capsys) -> None:
    a = _write(tmp_path, _good_layer(), name="a.safetensors")
    missing = str(tmp_path / "nope")
    rc, err = _resize_cli(tmp_path, capsys, f"{a}:0.5,{missing}:0.5")
    assert rc == 2 and err == f"lora-extract: error: {missing}: no such LoRA file."


@pytest.mark.parametrize("up,down,shown", [
    ((8, 2), (2, 6), "up [8, 2] / down [2, 6]"),      # another input width
    ((6, 2), (2, 8), "up [6, 2] / down [2, 8]"),      # another output width
], ids=["down differs", "up differs"])
def test_merge_of_loras_for_different_models_names_layer_and_file(tmp_path, capsys, up, down, shown) -> None:
    a = _write(tmp_path, _good_layer(), name="a.safetensors")
    b = _write(tmp_path, {f"{P}.lora_up.weight": torch.randn(up), f"{P}.lora_down.weight": torch.randn(down),
                          f"{P}.alpha": torch.tensor(2.0)}, name="b.safetensors")
    from lora_extract.resize.merge import open_lora_input

    with pytest.raises(ExtractionInputError) as info:
        open_lora_input(f"{a}:0.5,{b}:0.5").factors(P, "cpu")
    assert str(info.value) == (f"layer {P!r}: b.safetensors has {shown}, which does not match the other "
                               "merged LoRAs. Merge LoRAs made for the same model.")


RECIPE_HELP = ("Write e.g. 'fro_ckpt=1,thr=-3.5' or 'spn_ckpt=0.8,params=0.2,size=32'; methods: "
               "fro_ckpt, fro_lora, params, spn_ckpt, spn_lora, subspace; selection: thr= or size= "
               "and/or rank=N; optional rescale=.")


@pytest.mark.parametrize("recipe,why", [
    ("", "it is empty"),
    ("fro_ckpt=abc,thr=-1", "fro_ckpt='abc' is not a number"),
    ("fro_ckpt,thr=inf", "thr='inf' is not finite"),
    ("fro_ckpt,fro_ckpt=2,thr=1", "fro_ckpt is given twice"),
    ("fro_ckpt=-1,spn_lora,thr=1", "weight fro_ckpt=-1 is negative"),
    ("fro_ckpt,size=", "size needs a value (size=...)"),
    ("fro_ckpt,size=0", "size=0 must be a positive number of MiB"),
    ("fro_ckpt,thr=1,rescale=-2", "rescale=-2 must be positive"),
    ("fro_ckpt,thr=1,frolora=1", "unknown key 'frolora'"),
    ("fro_ckpt=0,thr=1", "no scoring method with a positive weight"),
    ("spn_lora", "give exactly one of thr= and size=, or rank=N alone"),
    ("spn_lora,thr=1,size=2", "give exactly one of thr= and size= (rank=N may cap either)"),
    ("spn_lora,rank=0", "rank=0 must be a whole number >= 1"),
    ("rank=2.5", "rank=2.5 must be a whole number >= 1"),
])
def test_bad_score_recipes_are_one_exact_error(recipe: str, why: str) -> None:
    with pytest.raises(ExtractionInputError) as info:
        recipe_mod.parse_recipes(f"spn_lora,thr=-1:{recipe}")
    assert str(info.value) == f"score recipe {recipe!r}: {why}. {RECIPE_HELP}"


def test_bad_score_recipe_on_the_command_line_is_one_line(tmp_path, capsys) -> None:
    lora = _write(tmp_path, _good_layer(), name="lora.safetensors")
    rc, err = _resize_cli(tmp_path, capsys, lora, "-r", "fro_ckpt=1,thr=-3.5:")
    assert rc == 2 and err == f"lora-extract: error: score recipe '': it is empty. {RECIPE_HELP}"


@pytest.mark.parametrize("blank", ["", "  ", "\n"])
def test_blank_score_recipes_mean_the_default_recipe(blank: str) -> None:
    assert [r.text for r in recipe_mod.parse_recipes(blank)] == ["fro_ckpt=1,thr=-3.5"]
