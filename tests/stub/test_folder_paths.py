"""The stub's ``folder_paths`` behaves like ComfyUI 0.3.64: model folders, file lists and full
paths, and the output-path counter with its refusal to leave the output folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import pytest

pytestmark = pytest.mark.usefixtures("fresh_comfy_stub")


def test_folders(tmp_path):
    folder_paths._set_base_dir(tmp_path)
    loras = tmp_path / "models" / "loras"
    assert folder_paths.get_output_directory() == str(tmp_path / "output")
    assert folder_paths.get_folder_paths("loras") == [str(loras)]
    assert folder_paths.get_folder_paths("unet") == [str(tmp_path / "models" / "unet"),
                                                     str(tmp_path / "models" / "diffusion_models")]
    for d in ("output", "models/loras", "models/checkpoints", "models/diffusion_models"):
        assert (tmp_path / d).is_dir()
    (loras / "sub").mkdir()
    (loras / "sub" / "b.safetensors").write_bytes(b"")
    (loras / "a.SFT").write_bytes(b"")
    (loras / "notes.txt").write_text("x")
    assert folder_paths.get_filename_list("loras") == ["a.SFT", os.path.join("sub", "b.safetensors")]
    assert folder_paths.get_full_path("loras", "a.SFT") == str(loras / "a.SFT")
    assert folder_paths.get_full_path("loras", "../loras/a.SFT") is None  # stays inside the folder
    assert folder_paths.get_full_path("nope", "a.SFT") is None
    with pytest.raises(FileNotFoundError):
        folder_paths.get_full_path_or_raise("loras", "missing.safetensors")


def test_save_image_path_counter_and_subfolder(tmp_path):
    out = str(tmp_path / "out")
    folder, name, counter, sub, prefix = folder_paths.get_save_image_path("loras/my_lora", out)
    assert (folder, name, counter, sub, prefix) == (os.path.join(out, "loras"), "my_lora", 1, "loras", "loras/my_lora")
    assert os.path.isdir(folder)  # created when missing
    for f in ("my_lora_00001_.safetensors", "my_lora_00007_.safetensors", "my_lora_x.txt",
              "my_lora2_00050_.safetensors", "MY_LORA_00003_.png"):
        Path(folder, f).write_bytes(b"")
    # "my_lora_x.txt" counts as number 0; "my_lora2_..." is another name
    assert folder_paths.get_save_image_path("loras/my_lora", out)[2] == 8
    assert folder_paths.get_save_image_path("img_%width%x%height%", out, 64, 32)[4] == "img_64x32"


def test_save_image_path_refuses_leaving_output(tmp_path, caplog):
    out = str(tmp_path / "out")
    with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="Saving image outside the output folder is not allowed"):
        folder_paths.get_save_image_path("../x", out)
    assert "outside the output folder" in caplog.text
    with pytest.raises(Exception, match="outside the output folder"):
        folder_paths.get_save_image_path("a/../../x", out)
    # ComfyUI compares output_dir verbatim: a trailing separator refuses even a valid prefix
    with pytest.raises(Exception, match="outside the output folder"):
        folder_paths.get_save_image_path("x", out + os.sep)
