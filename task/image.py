"""Image classification (`task.name=image`): any `AutoModelForImageClassification` from a
local folder, on a site's own images (a folder per class, or a CSV of paths and labels).

Model. `task.model` is a `from_pretrained` folder (ViT, ConvNeXt, ResNet, ...),
loaded offline; "" builds a small ResNet from a transformers config in code (random, seeded:
no weights ship). Opacus computes per-sample gradients, which BatchNorm mixes across the
batch, so every BatchNorm is replaced by a GroupNorm with `opacus.validators.ModuleValidator.fix`,
at the coordinator and at every site by this same function (the exchanged weights and the
frozen fingerprint match because both sides build the model identically); then
`ModuleValidator.validate` must find nothing left before any round. A BatchNorm's trained
statistics do not survive the swap (GroupNorm starts at weight 1, bias 0): a pretrained
BatchNorm model is partly re-initialised, and the run says in how many modules.
transformers' ResNet adds its shortcut in place to the output of a module that, under
Opacus' backward hooks, is a view (torch refuses: "Output 0 of BackwardHookFunction is a
view and is being modified inplace"); every `nn.Identity` is therefore swapped for a copy
(`_CopyIdentity`: no weights, the same values), which leaves the state-dict names intact.
timm models are not supported on this build: timm needs torchvision, and no torchvision
wheel matches torch 2.13 on CPU.

Pixels. Images are read with Pillow (PNG, JPEG, ...) or pydicom (DICOM: the pixel data
only, with the modality LUT (rescale slope/intercept) and the VOI LUT (windowing) if the
file has them, MONOCHROME1 inverted; header fields are read for these pixel transforms and
nothing else, and none of them leaves the site). Each image is resized (bilinear) to the
model's input size (its preprocessor_config.json, else its config's `image_size`, else
`task.image_size`), converted to the channels the model expects (grayscale repeated into
RGB) and kept as 8-bit; the module that trains scales it to [0, 1] and normalises with the
processor's mean and std. This is done in numpy/PIL, not with transformers' image
processors: their fast variants need torchvision, and one code path for every model keeps
the coordinator's and the sites' inputs identical.

Augmentation (`task.augment=flip_crop`): a random horizontal flip and a random crop of the
image padded by 1/8 of its side, per image and per step, in training only (central
evaluation and the frozen fingerprint never see it). Its randomness is torch's global
generator, which a site seeds for every round from its own seed (client/app.py
`local_update`: reproducible in simulation, secret in deployment), like the DP noise.

Default data: scikit-learn's bundled `load_digits` (1,797 real 8x8 handwritten digits, 10
classes), standing in for a site's imaging folder; `python -m fedshield.task.image
--write-digits DIR` writes it as a folder per class plus a CSV, so operators see both formats.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedshield.task.data import (
    DataError,
    LabeledData,
    _csv_records,
    _jsonl_records,
    _utf8_lines,
    check_data_file,
)
from fedshield.task.model import (
    WEIGHT_FILES,
    ModelError,
    _check_weights,
    _quiet_transformers,
    _read_json,
    _regular,
)

log = logging.getLogger("fedshield.task.image")

AUGMENTS = ("none", "flip_crop")
# What a site's folder may hold; anything else in a class folder is refused by name (a stray
# file is more likely a mistake than something to skip silently).
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES
# The default model's normalisation: pixels in [0, 1] mapped to [-1, 1].
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5


class _CopyIdentity(nn.Identity):
    """nn.Identity that returns a copy (module docstring: in-place adds after a hooked module)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.clone()


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class InputSpec:
    """What the model reads: (height, width), channels, and per-channel mean and std of
    pixels scaled to [0, 1]. Public: it comes from the model folder or the config."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def image_model_folder(model: str) -> Path:
    """`task.model` checked as an image model folder without loading it: a config.json
    that parses and a weights file `from_pretrained` would read (safetensors checked
    against its header). One line (`ModelError`) otherwise."""
    where = f"task.model={model!r}"
    p = Path(model)
    if not p.is_dir():
        raise ModelError(f"{where}: no such folder (a from_pretrained folder: config.json and weights)")
    config = _read_json(p / "config.json", where)
    if not isinstance(config.get("model_type"), str):
        raise ModelError(f"{where}: config.json has no model_type")
    present = [name for name in WEIGHT_FILES if _regular(p / name) is not None]
    if not present:
        raise ModelError(f"{where}: no weights file ({', '.join(WEIGHT_FILES)})")
    _check_weights(p, present[0], where)
    return p


def _pair(value: object, where: str) -> tuple[int, int] | None:
    """An image size from a config: an int, [h, w], or {height, width} / {shortest_edge}."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return (int(value["height"]), int(value["width"]))
        if isinstance(value.get("shortest_edge"), int):
            return (int(value["shortest_edge"]), int(value["shortest_edge"]))
    if value is not None:
        raise ModelError(f"{where}: image size {value!r} is not an int, [height, width] or {{height, width}}")
    return None


def _per_channel(value: object, channels: int, default: float, where: str) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    values = [value] if isinstance(value, int | float) else value
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        raise ModelError(f"{where}: {value!r} is not a number or a list of numbers")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ModelError(f"{where}: {len(values)} values for a model of {channels} channels")
    return tuple(float(v) for v in values)


def input_spec(model: str, image_size: int) -> InputSpec:
    """The model's input: its preprocessor_config.json (size, crop_size, image_mean,
    image_std), else its config.json (`image_size`, `num_channels`), else `image_size`
    and mean = std = 0.5 (the default model's own normalisation)."""
    if not model:
        return InputSpec((image_size, image_size), 3, (DEFAULT_MEAN,) * 3, (DEFAULT_STD,) * 3)
    folder = image_model_folder(model)
    where = f"task.model={model!r}"
    config = _read_json(folder / "config.json", where)
    pre_path = folder / "preprocessor_config.json"
    pre = _read_json(pre_path, where) if _regular(pre_path) is not None else {}
    channels = config.get("num_channels", 3)
    if not isinstance(channels, int) or channels not in (1, 3):
        raise ModelError(f"{where}: config.json num_channels={channels!r}; images have 1 or 3 channels")
    size = (_pair(pre.get("crop_size"), f"{where}: preprocessor_config.json crop_size")
            if pre.get("do_center_crop") else None) \
        or _pair(pre.get("size"), f"{where}: preprocessor_config.json size") \
        or _pair(config.get("image_size"), f"{where}: config.json image_size") \
        or (image_size, image_size)
    if pre.get("do_normalize", True) is False:
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean = _per_channel(pre.get("image_mean"), channels, DEFAULT_MEAN, f"{where}: image_mean")
        std = _per_channel(pre.get("image_std"), channels, DEFAULT_STD, f"{where}: image_std")
    if min(size) < 1 or not all(math.isfinite(s) and s > 0 for s in std):
        raise ModelError(f"{where}: image size {size} and std {std} must be positive")
    return InputSpec(size, channels, mean, std)


def default_model_config(class_names: Sequence[str]) -> Any:
    """The default model: a small ResNet (2 stages of basic blocks, widths 16 and 32, about
    22k weights), random and seeded. Small on purpose: under DP-SGD every weight adds noise,
    and the bundled digits are 1,797 images."""
    from transformers import ResNetConfig

    labels: dict[str, Any] = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
                              "label2id": {c: i for i, c in enumerate(class_names)}}  # PretrainedConfig's kwargs
    return ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        layer_type="basic", **labels)


def make_private_ready(model: nn.Module, where: str) -> tuple[nn.Module, int]:
    """`model` as Opacus can train it: BatchNorm -> GroupNorm (ModuleValidator.fix), every
    nn.Identity a copy, then ModuleValidator.validate. (model, how many BatchNorms went)."""
    from opacus.validators import ModuleValidator

    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fixed: nn.Module = ModuleValidator.fix(model) if batch_norms else model
    for parent in list(fixed.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Identity:
                setattr(parent, name, _CopyIdentity())
    fixed.train(True)  # validate checks training mode too (from_pretrained returns eval mode)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ModelError(f"{where}: Opacus cannot train this model: {' '.join(str(errors[0]).split())[:200]}")
    return fixed, batch_norms


def build_image_model(model: str, class_names: Sequence[str], seed: int) -> nn.Module:
    """The task's initial model, built identically at the coordinator and at every site:
    the folder's weights (a head for these classes, new and seeded if its size differs) or
    the default ResNet (seeded), made Opacus-ready (`make_private_ready`)."""
    _quiet_transformers()
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {c: i for i, c in enumerate(class_names)}}
    where = f"task.model={model!r}"
    try:
        if model:
            built: nn.Module = AutoModelForImageClassification.from_pretrained(
                str(image_model_folder(model)), ignore_mismatched_sizes=True, **labels)
        else:
            built = AutoModelForImageClassification.from_config(  # type: ignore[no-untyped-call]
                default_model_config(class_names))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # not an image classifier, a bad config
        raise ModelError(f"{where}: not loadable as an image classifier: {' '.join(str(exc).split())[:200]}") \
            from None
    fixed, batch_norms = make_private_ready(built, where)
    if batch_norms:
        # A warning: the coordinator's run output shows it, and the exported config records it.
        log.warning("image model: BatchNorm → GroupNorm in %d modules (Opacus needs per-sample gradients; "
                    "their running statistics are not kept)", batch_norms)
    config = getattr(fixed, "config", None)
    if config is not None:
        config.fedshield_batchnorm_to_groupnorm = batch_norms  # saved with the exported model
    return fixed


def write_preprocessor_config(model: str, image_size: int, out: Path) -> None:
    """What the exported model reads, as transformers' image processors write it: resize
    to the input size, rescale by 1/255, normalise with the mean and std used in training."""
    spec = input_spec(model, image_size)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": spec.size[0], "width": spec.size[1]}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(spec.mean), "image_std": list(spec.std),
    }, indent=2))


def load_exported(folder: str | os.PathLike[str]) -> nn.Module:
    """A model `export_model` saved: the architecture from its config, made Opacus-ready as in
    training (its BatchNorms were GroupNorms), then its weights. Offline, no fedshield run needed."""
    _quiet_transformers()
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageClassification

    path = Path(folder)
    built = AutoModelForImageClassification.from_config(  # type: ignore[no-untyped-call]
        AutoConfig.from_pretrained(str(path)))
    fixed, _ = make_private_ready(built, str(path))
    fixed.load_state_dict(load_file(str(path / "model.safetensors")))
    fixed.train(False)
    return fixed


def head_names(model: nn.Module) -> list[str]:
    """The classification head's weights (`classifier`, as transformers' image classifiers
    name it): what `training.trainable=last_layers` (last_layers=0) trains."""
    names = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    if not names:
        raise ModelError("training.trainable=last_layers: this image model has no `classifier` head; "
                         "use training.trainable=all")
    return names


# ------------------------------------------------------------------------ what trains


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip (p = 1/2) and random crop of the image zero-padded by 1/8 of
    its side (at least 1 pixel), independently per image; x is (batch, C, H, W)."""
    b, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 8))
    device = x.device
    flip = torch.rand(b, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    return torch.stack([padded[i, :, int(dy): int(dy) + h, int(dx): int(dx) + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


class ImageClassifier(nn.Module):
    """8-bit pixels (batch, C, H, W) -> logits: scale to [0, 1], augment (training only,
    `task.augment`), normalise with the model's mean and std, run the model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, spec: InputSpec, augment: str) -> None:
        super().__init__()
        self.model = model
        self.augment = augment
        self.generator: torch.Generator | None = None  # None: torch's global one, seeded per round by the site
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.dtype) / 255.0
        if self.training and self.augment == "flip_crop":
            x = augment_batch(x, self.generator)
        x = (x - self.mean) / self.std
        logits: torch.Tensor = self.model(pixel_values=x).logits
        return logits


# ---------------------------------------------------------------------------- reading


def _dicom_pixels(path: Path) -> np.ndarray:
    """A DICOM file's pixels, modality and VOI LUTs applied, as a float array (H, W) or
    (H, W, 3). No other header field is read."""
    import pydicom
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        raise ValueError(f"a multi-frame DICOM ({frames} frames); export one image per file")
    if samples == 1:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    values = np.asarray(arr, dtype=np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":  # 0 is white there
        values = values.max() - values
    return values


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Any pixel range to 0..255 by this image's own min and max (a 12- or 16-bit scan)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("non-finite pixel values")
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_model_pixels(image: Any, spec: InputSpec) -> np.ndarray:
    """A PIL image -> uint8 (C, H, W) at the model's size and channels (grayscale repeated
    into RGB, RGB averaged into gray)."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # more than 8 bits: rescale, do not clip
        image = Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float64)), "L")
    image = image.convert("L" if spec.channels == 1 else "RGB")
    height, width = spec.size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file as uint8 (C, H, W) for the model; `DataError` naming the file if it
    cannot be read (corrupt, truncated, not an image, an unsupported DICOM encoding)."""
    from PIL import Image

    if _regular(path) is None:  # opening a FIFO blocks until a writer comes; a device is no image
        raise DataError(f"{path}: not a regular file; expected an image")
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            values = _dicom_pixels(path)
            image = Image.fromarray(_to_uint8(values), "RGB" if values.ndim == 3 else "L")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # a pixel bomb is no scan
                with Image.open(path) as opened:
                    opened.load()
                    image = opened.copy()
        return to_model_pixels(image, spec)
    except Exception as exc:  # noqa: BLE001 - Pillow's and pydicom's decoders raise many kinds: one line each
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DataError(f"{path}: cannot read this image ({detail})") from None


def _classes(found: Sequence[str], fixed: Sequence[str] | None, where: str) -> list[str]:
    if not fixed:
        return sorted(set(found))
    names = [str(c) for c in fixed]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: the task's class names repeat: {', '.join(names)}")
    other = sorted(set(found) - set(names))
    if other:
        raise DataError(f"{where}: class {other[0]!r} is not one of the task's classes: {', '.join(names)}")
    return names


def _image_data(files: list[Path], labels: list[str], class_names: list[str], spec: InputSpec,
                source: Path) -> LabeledData:
    index = {c: k for k, c in enumerate(class_names)}
    h, w = spec.size
    pixels = np.empty((len(files), spec.channels, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        pixels[i] = read_image(f, spec)
    return LabeledData(labels=np.asarray([index[c] for c in labels], dtype=np.int64), class_names=class_names,
                       images=pixels, source=str(source))


def _inside(base: Path, path: Path) -> bool:
    """`path` (symlinks resolved) lies inside `base` (resolved)."""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _folder_files(root: Path, class_dir: Path) -> Iterator[Path]:
    for p in sorted(class_dir.rglob("*")):
        rel = p.relative_to(class_dir)
        if any(part.startswith(".") for part in rel.parts) or p.is_dir():
            continue  # hidden files (.DS_Store, editors' swap files) are not records
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        if not _inside(root, p):
            raise DataError(f"{p}: a link that leads outside {root}; images must lie inside the data folder")
        yield p


def load_image_folder(root: Path, spec: InputSpec, labels: Sequence[str] | None = None) -> LabeledData:
    """A folder with one subfolder per class (its name is the label), images inside."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders (one subfolder per class, its images inside)")
    class_names = _classes([d.name for d in class_dirs], labels, str(root))
    files: list[Path] = []
    row_labels: list[str] = []
    for d in class_dirs:
        for f in _folder_files(root, d):
            files.append(f)
            row_labels.append(d.name)
    if not files:
        raise DataError(f"{root}: no images in its class folders")
    return _image_data(files, row_labels, class_names, spec, root)


def _image_path(base: Path, value: str, where: str) -> Path:
    """A CSV's image path, relative to the CSV's folder and never outside it: an absolute
    path, a '..' or a link out is refused (a shared CSV must not read other files of the site)."""
    if not value:
        raise DataError(f"{where}: empty image path")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: image path {value!r} leaves the CSV's folder {base} "
                        "(paths are relative to it, without '..')")
    path = base / rel
    if not path.is_file():
        raise DataError(f"{where}: image {value!r}: no such file in {base}")
    if not _inside(base, path):
        raise DataError(f"{where}: image {value!r} is a link that leads outside {base}")
    return path


def load_image_table(table: Path, spec: InputSpec, path_column: str, label_column: str,
                     labels: Sequence[str] | None = None) -> LabeledData:
    """A CSV (or JSONL) of image paths and labels; the paths are relative to its folder."""
    p = check_data_file(table)
    reader = _csv_records if p.suffix.lower() == ".csv" else _jsonl_records
    base = p.parent
    files: list[Path] = []
    row_labels: list[str] = []
    for line, values in reader(p, _utf8_lines(p), [path_column, label_column]):
        where = f"{p}:{line}"
        label = str(values[1]).strip() if values[1] is not None else ""
        if not label:
            raise DataError(f"{where}: empty label in column {label_column!r}")
        files.append(_image_path(base, str(values[0] or "").strip(), where))
        row_labels.append(label)
    if not files:
        raise DataError(f"{p}: no data rows")
    class_names = _classes(row_labels, labels, str(p))
    return _image_data(files, row_labels, class_names, spec, p)


def load_images(path: str, spec: InputSpec, path_column: str, label_column: str,
                labels: Sequence[str] | None = None) -> LabeledData:
    """A site's images: a folder per class (a folder) or a table of paths (a file)."""
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p, spec, labels)
    if not p.exists():
        raise DataError(f"{p}: no such folder or file (task.data_path: a folder per class, or a CSV of paths)")
    return load_image_table(p, spec, path_column, label_column, labels)


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as 8-bit (n, 8, 8) images (its 0..16 scale stretched) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64)


def load_digits_images(spec: InputSpec) -> LabeledData:
    """The default image data: 1,797 handwritten digits, classes "0" to "9"."""
    from PIL import Image

    images, labels = digits_pixels()
    h, w = spec.size
    pixels = np.empty((len(images), spec.channels, h, w), dtype=np.uint8)
    for i, img in enumerate(images):
        pixels[i] = to_model_pixels(Image.fromarray(img, "L"), spec)
    return LabeledData(labels=labels, class_names=[str(k) for k in range(10)], images=pixels,
                       source="sklearn.datasets.load_digits")


def write_digits(out: Path) -> int:
    """The bundled digits as a site's folder: out/<digit>/<index>.png, and out/labels.csv
    (columns path, label) listing the same files. Returns the number of images."""
    from PIL import Image

    images, labels = digits_pixels()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        rel = Path(str(label)) / f"{i:04d}.png"
        (out / rel.parent).mkdir(exist_ok=True)
        Image.fromarray(img, "L").save(out / rel)
        rows.append((rel.as_posix(), str(label)))
    tmp = out / ".labels.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    os.replace(tmp, out / "labels.csv")
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedshield.task.image",
        description="Write scikit-learn's bundled digits as an image folder (one subfolder per class) "
                    "plus labels.csv: the formats task=image reads from task.data_path.")
    parser.add_argument("--write-digits", metavar="DIR", required=True, type=Path)
    args = parser.parse_args(argv)
    n = write_digits(args.write_digits)
    print(f"{n} images in {args.write_digits}/<class>/*.png and {args.write_digits}/labels.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
