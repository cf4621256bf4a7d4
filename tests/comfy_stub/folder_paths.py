"""Stub of ComfyUI's top-level ``folder_paths`` module (ComfyUI 0.3.64 behaviour).

All folders hang off one base directory, set with the stub-only ``_set_base_dir(path)``
(which also creates ``output``, ``models/loras``, ``models/checkpoints`` and
``models/diffusion_models``). Until a test calls it, the base is ``<tmp>/comfy_stub`` and
nothing is created. Unlike the real module, file lists are never cached.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Collection

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

folder_names_and_paths: dict[str, tuple[list[str], set[str] | list[str]]] = {}
base_path: str = ""
models_dir: str = ""
output_directory: str = ""
temp_directory: str = ""
input_directory: str = ""
user_directory: str = ""

# folder name -> sub-paths of models_dir, in ComfyUI's order (first = default for new files)
_MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "embeddings": ("embeddings",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "upscale_models": ("upscale_models",),
    "model_patches": ("model_patches",),
}


def _set_base_dir(path: str | os.PathLike[str], create: bool = True) -> None:
    """Stub-only: point every folder at ``path`` (like ComfyUI's ``--base-directory``)."""
    global base_path, models_dir, output_directory, temp_directory, input_directory, user_directory
    base_path = os.path.abspath(os.fspath(path))
    models_dir = os.path.join(base_path, "models")
    folder_names_and_paths.clear()
    for name, subs in _MODEL_FOLDERS.items():
        folder_names_and_paths[name] = ([os.path.join(models_dir, s) for s in subs], supported_pt_extensions)
    folder_names_and_paths["configs"] = ([os.path.join(models_dir, "configs")], [".yaml"])
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    user_directory = os.path.join(base_path, "user")
    if create:
        for d in (output_directory, os.path.join(models_dir, "loras"), os.path.join(models_dir, "checkpoints"),
                  os.path.join(models_dir, "diffusion_models")):
            os.makedirs(d, exist_ok=True)


_set_base_dir(os.path.join(tempfile.gettempdir(), "comfy_stub"), create=False)


def map_legacy(folder_name: str) -> str:
    """Old folder names: ``unet`` -> ``diffusion_models``, ``clip`` -> ``text_encoders``."""
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def set_output_directory(output_dir: str) -> None:
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir: str) -> None:
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir: str) -> None:
    global input_directory
    input_directory = input_dir


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def get_directory_by_type(type_name: str) -> str | None:
    """``output``/``temp``/``input`` directory, else None."""
    return {"output": get_output_directory, "temp": get_temp_directory,
            "input": get_input_directory}.get(type_name, lambda: None)()


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Register another search path for ``folder_name`` (first in the list when ``is_default``)."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    """A copy of the search paths of ``folder_name`` (KeyError if unknown, like the real one)."""
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict[str, float]]:
    """Relative paths of all files under ``directory`` and the mtimes of its folders."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = excluded_dir_names or []
    files: list[str] = []
    dirs = {directory: os.path.getmtime(directory)}
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        files.extend(os.path.relpath(os.path.join(dirpath, f), directory) for f in filenames)
        for d in subdirs:
            dirs[os.path.join(dirpath, d)] = os.path.getmtime(os.path.join(dirpath, d))
    return files, dirs


def filter_files_extensions(files: Collection[str], extensions: Collection[str]) -> list[str]:
    """Sorted files whose lower-cased extension is in ``extensions`` (all when it is empty)."""
    return sorted(f for f in files if len(extensions) == 0 or os.path.splitext(f)[-1].lower() in extensions)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Absolute path of ``filename`` in the first search path of ``folder_name`` that has it.

    ``filename`` is made relative first (``/etc/x`` and ``../x`` stay inside the folder).
    """
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for folder in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(folder, filename)
        if os.path.isfile(full_path):
            return full_path
        if os.path.islink(full_path):
            logging.warning(f"WARNING path {full_path} exists but doesn't link anywhere, skipping.")
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    """``get_full_path`` or ``FileNotFoundError``."""
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def get_filename_list(folder_name: str) -> list[str]:
    """Sorted relative paths of the model files in every search path of ``folder_name``."""
    folder_name = map_legacy(folder_name)
    paths, extensions = folder_names_and_paths[folder_name]
    found: set[str] = set()
    for folder in paths:
        files, _ = recursive_search(folder, excluded_dir_names=[".git"])
        found.update(filter_files_extensions(files, extensions))
    return sorted(found)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """Where to save the next file for ``filename_prefix``, as ComfyUI's savers do.

    Returns ``(full_output_folder, filename, counter, subfolder, filename_prefix)``: the prefix
    may hold a subfolder (``"loras/my_lora"``) and ``%width%``-style variables (expanded in the
    returned prefix). ``counter`` is one more than the largest N among existing files named
    ``<filename>_N...`` in that folder (1 if none), so a caller writes
    ``f"{filename}_{counter:05}_.ext"``. The folder is created when missing. A prefix leaving
    ``output_dir`` (``"../x"``) raises ``Exception`` ("Saving image outside the output folder is
    not allowed"). ``output_dir`` must be absolute and without a trailing separator, or even a
    valid prefix is refused (a relative one raises ``ValueError``): ComfyUI compares it verbatim.
    """
    if "%" in filename_prefix:
        now = time.localtime()
        values = {
            "%width%": str(image_width), "%height%": str(image_height), "%year%": str(now.tm_year),
            "%month%": str(now.tm_mon).zfill(2), "%day%": str(now.tm_mday).zfill(2),
            "%hour%": str(now.tm_hour).zfill(2), "%minute%": str(now.tm_min).zfill(2),
            "%second%": str(now.tm_sec).zfill(2),
        }
        for var, value in values.items():
            filename_prefix = filename_prefix.replace(var, value)

    normalized = os.path.normpath(filename_prefix)
    subfolder = os.path.dirname(normalized)
    filename = os.path.basename(normalized)
    full_output_folder = os.path.join(output_dir, subfolder)

    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        err = ("**** ERROR: Saving image outside the output folder is not allowed."
               "\n full_output_folder: " + os.path.abspath(full_output_folder)
               + "\n         output_dir: " + output_dir
               + "\n         commonpath: " + common)
        logging.error(err)
        raise Exception(err)

    # ComfyUI measures the name part with basename(prefix) (not normalized: "a/" gives 0).
    name_len = len(os.path.basename(filename_prefix))

    def number_of(existing: str) -> int | None:
        head, rest = existing[: name_len + 1], existing[name_len + 1:]
        if not head or head[-1] != "_" or os.path.normcase(head[:-1]) != os.path.normcase(filename):
            return None
        try:
            return int(rest.split("_")[0])
        except ValueError:
            return 0

    try:
        numbers = [n for n in map(number_of, os.listdir(full_output_folder)) if n is not None]
        counter = max(numbers) + 1 if numbers else 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix
