"""task=image (task/image.py): reading a site's images (folder, CSV; PNG, JPEG, DICOM),
refusing what it must, the BatchNorm -> GroupNorm fix, augmentation, a DP step, and one
2-site, 2-round DP simulation whose ledger audits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.task import image, pipeline
from fedshield.task.data import DataError
from fedshield.task.image import InputSpec
from fedshield.task.trainer import LocalPlan, train_local

GRAY8 = InputSpec((8, 8), 3, (0.5,) * 3, (0.5,) * 3)


def write_dicom(path: Path, pixels: np.ndarray, **header: object) -> Path:
    """A minimal single-frame 16-bit grayscale DICOM file (pydicom writes it)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Secret^Patient"  # a header field that must never be read into anything
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in header.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def gradient(value: int, size: int = 8) -> np.ndarray:
    return np.clip(np.arange(size * size).reshape(size, size) * 3 + value, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Class `cat`: a PNG and a JPEG; class `dog`: a PNG and a DICOM."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(gradient(0), "L").save(root / "cat" / "a.png")
    Image.fromarray(np.stack([gradient(10)] * 3, -1), "RGB").save(root / "cat" / "b.jpg", quality=95)
    Image.fromarray(gradient(100), "L").save(root / "dog" / "c.png")
    write_dicom(root / "dog" / "d.dcm", np.arange(64).reshape(8, 8) * 50)
    (root / ".DS_Store").write_bytes(b"hidden files are not records")
    return root


def test_folder_of_png_jpeg_and_dicom_is_read_per_class_at_the_model_size(image_folder: Path) -> None:
    spec = InputSpec((16, 12), 3, (0.5,) * 3, (0.5,) * 3)
    data = image.load_images(str(image_folder), spec, "path", "label")
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images is not None and data.images.shape == (4, 3, 16, 12) and data.images.dtype == np.uint8
    # Grayscale is repeated into the model's three channels.
    assert (data.images[0, 0] == data.images[0, 1]).all() and (data.images[0, 1] == data.images[0, 2]).all()
    # The DICOM's 12-bit ramp is stretched to the full 8-bit range (its own min and max).
    assert data.images[3].min() == 0 and data.images[3].max() >= 250
    one = image.load_images(str(image_folder), InputSpec((8, 8), 1, (0.5,), (0.5,)), "path", "label")
    assert one.images is not None and one.images.shape == (4, 1, 8, 8)


def test_dicom_rescale_and_window_are_applied_to_the_pixels(tmp_path: Path) -> None:
    ramp = np.arange(64).reshape(8, 8) * 10  # 0..630
    plain = image.read_image(write_dicom(tmp_path / "plain.dcm", ramp), GRAY8)[0]
    # A window of width 100 around 300 (after the rescale 2x - 100 = 500): values below 250 black, above 350 white.
    windowed = image.read_image(write_dicom(tmp_path / "w.dcm", ramp, RescaleSlope=2, RescaleIntercept=-100,
                                            WindowCenter=300, WindowWidth=100), GRAY8)[0]
    assert not np.array_equal(plain, windowed)
    raw = ramp * 2 - 100
    assert (windowed[raw < 250] == 0).all() and (windowed[raw > 350] == 255).all()
    inverted = image.read_image(write_dicom(tmp_path / "m1.dcm", ramp, PhotometricInterpretation="MONOCHROME1"),
                                GRAY8)[0]
    assert inverted[0, 0] == 255 and inverted[-1, -1] == 0  # MONOCHROME1: 0 is white


def test_csv_of_relative_paths_and_labels(image_folder: Path) -> None:
    table = image_folder / "labels.csv"
    table.write_text("path,diagnosis\ncat/a.png,healthy\ndog/d.dcm,sick\ndog/c.png,healthy\n")
    data = image.load_images(str(table), GRAY8, "path", "diagnosis", labels=["sick", "healthy"])
    assert data.class_names == ["sick", "healthy"] and data.labels.tolist() == [1, 0, 1]
    assert data.images is not None and data.images.shape == (3, 3, 8, 8)
    with pytest.raises(DataError, match=r"labels\.csv:1: no column 'label'"):
        image.load_images(str(table), GRAY8, "path", "label")
    with pytest.raises(DataError, match="class 'healthy' is not one of the task's classes"):
        image.load_images(str(table), GRAY8, "path", "diagnosis", labels=["sick", "other"])


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "cat/../../outside.png", "link.png"])
def test_an_image_path_outside_the_csv_folder_is_refused(image_folder: Path, path: str) -> None:
    outside = image_folder.parent / "outside.png"
    Image.fromarray(gradient(5), "L").save(outside)
    (image_folder / "link.png").symlink_to(outside)
    table = image_folder / "t.csv"
    table.write_text(f"path,label\ncat/a.png,cat\n{path},dog\n")
    with pytest.raises(DataError, match=r"t\.csv:3: image .*(leaves the CSV's folder|link that leads outside)"):
        image.load_images(str(table), GRAY8, "path", "label")


def test_a_folder_link_out_of_the_data_folder_is_refused(image_folder: Path) -> None:
    outside = image_folder.parent / "elsewhere.png"
    Image.fromarray(gradient(5), "L").save(outside)
    (image_folder / "dog" / "e.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"e\.png: a link that leads outside"):
        image.load_images(str(image_folder), GRAY8, "path", "label")


@pytest.mark.parametrize("name,content", [
    ("broken.png", b"\x89PNG\r\n\x1a\n not really a png"),
    ("broken.dcm", b"not a dicom file at all"),
    ("notes.txt", b"a stray file"),
])
def test_an_unreadable_file_is_one_line_naming_it(image_folder: Path, name: str, content: bytes) -> None:
    (image_folder / "dog" / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        image.load_images(str(image_folder), GRAY8, "path", "label")
    message = str(err.value)
    assert message.startswith(str(image_folder / "dog" / name)) and "\n" not in message


def test_a_fifo_among_the_images_is_refused_without_opening_it(image_folder: Path) -> None:
    import os

    os.mkfifo(image_folder / "dog" / "pipe.png")  # opening it to read would block forever
    with pytest.raises(DataError, match=r"pipe\.png: not a regular file"):
        image.load_images(str(image_folder), GRAY8, "path", "label")


def test_a_truncated_jpeg_names_the_file(image_folder: Path) -> None:
    whole = (image_folder / "cat" / "b.jpg").read_bytes()
    (image_folder / "cat" / "b.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"b\.jpg: cannot read this image"):
        image.load_images(str(image_folder), GRAY8, "path", "label")


def test_schema_keys_and_what_an_image_model_can_train() -> None:
    cfg = Config.load(["task=image"])
    assert (cfg.task.name, cfg.task.augment, cfg.training.trainable) == ("image", "none", "all")
    with pytest.raises(ConfigError, match="task.augment='rotate': must be one of none, flip_crop"):
        Config.load(["task=image", "task.augment=rotate"])
    with pytest.raises(ConfigError, match="training.trainable='lora'"):
        Config.load(["task=image", "training.trainable=lora"])
    with pytest.raises(ConfigError, match="task.image_size=2: must be between 4 and 1024"):
        Config.load(["task=image", "task.image_size=2"])


def _small(tmp_path: Path, *extra: str) -> Config:
    return Config.load(["task=image", "task.image_size=8", f"output.dir={tmp_path}", *extra])


def test_batchnorm_becomes_groupnorm_identically_on_both_sides(tmp_path: Path, caplog) -> None:
    cfg = _small(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedshield.task.image"):
        pipeline._base_model.cache_clear()
        coordinator = pipeline.build_view(cfg)
        pipeline._base_model.cache_clear()  # a site builds its own, in another process
        site = pipeline.build_view(cfg)
    assert "BatchNorm → GroupNorm in 6 modules" in caplog.text
    for view in (coordinator, site):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in view.model.modules())
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in view.model.modules()) == 6
    a, b = coordinator.model.state_dict(), site.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert coordinator.trainable_names == site.trainable_names == [n for n, _ in site.model.named_parameters()]


def test_a_pretrained_batchnorm_folder_is_fixed_and_gets_a_head_for_the_task(tmp_path: Path, caplog) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    folder = tmp_path / "resnet"
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3, image_size=12)
    ResNetForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 12, "width": 12}, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.2, 0.2]}))
    spec = image.input_spec(str(folder), 32)
    assert spec == InputSpec((12, 12), 3, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    with caplog.at_level(logging.WARNING, logger="fedshield.task.image"):
        model = image.build_image_model(str(folder), [str(k) for k in range(10)], seed=1)
    assert "BatchNorm → GroupNorm in 6 modules" in caplog.text
    logits = image.ImageClassifier(model, spec, "none")(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))
    assert logits.shape == (2, 10)  # the 3-output head was replaced by one for the task's 10 classes
    with pytest.raises(image.ModelError, match="no weights file"):
        (folder / "model.safetensors").unlink()
        image.input_spec(str(folder), 32)


def test_augmentation_is_a_function_of_the_seed_and_only_in_training() -> None:
    x = torch.rand(6, 3, 16, 16)
    same = [image.augment_batch(x, torch.Generator().manual_seed(3)) for _ in range(2)]
    other = image.augment_batch(x, torch.Generator().manual_seed(4))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other) and same[0].shape == x.shape
    model = image.build_image_model("", ["a", "b"], seed=0)
    module = image.ImageClassifier(model, InputSpec((16, 16), 3, (0.5,) * 3, (0.5,) * 3), "flip_crop")
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    module.train(False)
    plain = image.ImageClassifier(model, InputSpec((16, 16), 3, (0.5,) * 3, (0.5,) * 3), "none").train(False)
    assert torch.equal(module(pixels), plain(pixels))  # evaluation never augments
    module.train(True)
    module.generator = torch.Generator().manual_seed(9)
    first = module(pixels)
    module.generator = torch.Generator().manual_seed(9)
    assert torch.equal(first, module(pixels))


def test_a_dp_step_changes_every_trainable_weight(tmp_path: Path) -> None:
    cfg = _small(tmp_path, "task.augment=flip_crop")
    view = pipeline.build_view(cfg)
    data = pipeline.pool_and_test(cfg)[1].subset(np.arange(64))
    dataset = pipeline.encode(cfg, view, data)
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    plan = LocalPlan(epochs=1, batch_size=32, max_physical_batch_size=32, learning_rate=0.5, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(0)
    result = train_local(view.module, dataset, plan, device=torch.device("cpu"), generator=torch.Generator())
    assert result.steps == 2 and result.spends
    after = view.trainable_state()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == list(before) and all(np.isfinite(v).all() for v in after.values())


def test_last_layers_trains_the_head_only(tmp_path: Path) -> None:
    cfg = _small(tmp_path, "training.trainable=last_layers", "training.last_layers=0")
    view = pipeline.build_view(cfg)
    assert view.trainable_names == ["classifier.1.weight", "classifier.1.bias"]
    assert view.fingerprint != pipeline.build_view(_small(tmp_path)).fingerprint  # the frozen body is checked
    frozen = {k: v.clone() for k, v in view.model.state_dict().items() if k not in view.trainable_names}
    dataset = pipeline.encode(cfg, view, pipeline.pool_and_test(cfg)[1].subset(np.arange(32)))
    plan = LocalPlan(epochs=1, batch_size=16, max_physical_batch_size=16, learning_rate=0.5, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    train_local(view.module, dataset, plan, device=torch.device("cpu"), generator=torch.Generator())
    after = view.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_write_digits_gives_a_folder_and_a_csv_that_read_as_the_bundled_digits(tmp_path: Path) -> None:
    assert image.main(["--write-digits", str(tmp_path / "digits")]) == 0
    bundled = image.load_digits_images(GRAY8)
    folder = image.load_images(str(tmp_path / "digits"), GRAY8, "path", "label")
    table = image.load_images(str(tmp_path / "digits" / "labels.csv"), GRAY8, "path", "label")
    assert len(folder) == len(table) == len(bundled) == 1797
    assert folder.class_names == table.class_names == bundled.class_names == [str(k) for k in range(10)]
    # The CSV lists the files in the digits' order (PNG is lossless); the folder, class by class.
    assert np.array_equal(table.labels, bundled.labels) and np.array_equal(table.images, bundled.images)
    assert sorted(folder.labels.tolist()) == sorted(bundled.labels.tolist())


@pytest.mark.e2e
def test_two_sites_two_dp_rounds_on_an_image_folder_audit_and_export(tmp_path: Path) -> None:
    import fedshield
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    root = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("bright", 200)):
        (root / label).mkdir(parents=True)
        for i in range(40):
            pixels = np.clip(rng.normal(level, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / label / f"{i:02d}.png")
    cfg = Config.load([
        "task=image", f"task.data_path={root}", "task.image_size=8", "task.augment=flip_crop",
        "federation.num_sites=2", "federation.rounds=2", "training.batch_size=16",
        "privacy.delta=1e-3", "privacy.target_epsilon=8", f"output.dir={tmp_path / 'runs'}",
        "simulation.client_cpus=1",
    ])
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["trained"] == 2
    entries = read_jsonl(run / "privacy" / "ledger.jsonl")
    assert {e["site"] for e in entries} == {"site-0", "site-1"}
    assert sorted(e["release"] for e in entries) == ["dp-sgd"] * 4 + ["record-count"] * 2  # no feature mean
    assert "Secret" not in (run / "privacy" / "ledger.jsonl").read_text()
    result = fedshield.audit(run, write_report=False)
    assert result.ok, result.first_problem
    assert max(result.epsilon.values()) <= 8.0 + 1e-9
    exported = image.load_exported(run / "model")
    assert json.loads((run / "model" / "config.json").read_text())["fedshield_batchnorm_to_groupnorm"] == 6
    assert "Model: 6 BatchNorm layers were replaced by GroupNorm" in (run / "report.md").read_text()
    spec = image.input_spec(str(run / "model"), 99)
    assert spec.size == (8, 8)
    view = pipeline.build_view(cfg)
    view.load_trainable({k: v.numpy() for k, v in exported.state_dict().items() if k in view.trainable_names})
    test = pipeline.pool_and_test(cfg)[1]
    pixels = torch.from_numpy(test.images)
    view.module.train(False)
    assert torch.equal(view.module(pixels), image.ImageClassifier(exported, spec, "none")(pixels))


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_other_families_from_a_folder_train_under_dp(tmp_path: Path, family: str) -> None:
    from torch.utils.data import TensorDataset
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    folder = tmp_path / family
    if family == "vit":
        ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    else:
        ConvNextForImageClassification(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_stages=2, image_size=16)).save_pretrained(folder)
    spec = image.input_spec(str(folder), 99)
    assert spec.size == (16, 16)  # from its config.json (no preprocessor_config.json)
    model = image.build_image_model(str(folder), ["a", "b", "c"], seed=0)
    module = image.ImageClassifier(model, spec, "flip_crop")
    dataset = TensorDataset(torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (32,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = LocalPlan(epochs=1, batch_size=16, max_physical_batch_size=16, learning_rate=0.5, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    train_local(module, dataset, plan, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every weight, the head's too
