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
