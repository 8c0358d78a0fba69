"""Model files: round trip, validation of every part, pickles refused, registry."""

import dataclasses
import io
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from KidneyTumorSegLib.errors import ModelFileError
from KidneyTumorSegLib.model import DeepLabConfig, DeepLabV3Plus3D
from KidneyTumorSegLib.modelfile import (
    METADATA_KEY,
    create_untrained_model,
    load_model,
    read_metadata,
    read_registry,
    registry_path,
    resolve_model,
    sha256_of,
    untrained_metadata,
)

TINY = DeepLabConfig(
    stem_channels=4,
    stage_channels=(4, 8, 8, 8),
    stage_blocks=(1, 1, 1, 1),
    aspp_channels=8,
    low_level_channels=4,
    decoder_channels=8,
)


@pytest.fixture
def meta():
    return dataclasses.replace(untrained_metadata(TINY), patch_size_zyx=(16, 32, 32))


@pytest.fixture
def model_path(tmp_path, meta):
    path = tmp_path / "tiny.safetensors"
    create_untrained_model(path, meta, seed=1)
    return path


def _rewrite(path, out, edit_meta=None, edit_state=None):
    model = load_model(path)
    meta = model.metadata.to_json()
    state = {k: v.contiguous() for k, v in model.network.state_dict().items()}
    if edit_meta:
        edit_meta(meta)
    if edit_state:
        edit_state(state)
    save_file(state, str(out), metadata={METADATA_KEY: json.dumps(meta)})
    return out


def test_weights_and_metadata_round_trip(model_path, meta):
    loaded = load_model(model_path)
    torch.manual_seed(1)
    reference = DeepLabV3Plus3D(TINY)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name], tensor), name
    assert loaded.metadata.config == TINY
    assert loaded.metadata.patch_size_zyx == (16, 32, 32)
    assert loaded.metadata.labels == {"background": 0, "kidney": 1, "tumor": 2}
    assert loaded.metadata.provenance["code_version"]
    assert loaded.sha256 == sha256_of(model_path)
    assert not loaded.network.training


def test_half_precision_files_load_as_float32(tmp_path, meta):
    path = tmp_path / "half.safetensors"
    create_untrained_model(path, meta, half=True)
    full = tmp_path / "full.safetensors"
    create_untrained_model(full, meta)
    assert path.stat().st_size < 0.6 * full.stat().st_size
    assert all(p.dtype == torch.float32 for p in load_model(path).network.parameters())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format_version=99), "format version 99 is not supported"),
        (lambda m: m["architecture"].update(name="UNet3D"), "architecture 'UNet3D' is not supported"),
        (
            lambda m: m.update(patch_size_zyx="80x160x160"),
            "'patch_size_zyx' must be a list of 3 positive ints",
        ),
        (lambda m: m.update(patch_size_zyx=[17, 32, 32]), "must be multiples of"),
        (
            lambda m: m.update(target_spacing_zyx_mm=[3.0, -1.6, 1.6]),
            "'target_spacing_zyx_mm' must be a list of 3 positive",
        ),
        (lambda m: m.update(target_spacing_zyx_mm=[300.0, 1.6, 1.6]), "within 0.1-20 mm"),
        (lambda m: m["intensity"].update(clip_hu=[300, -100]), "must be increasing"),
        (lambda m: m["intensity"].update(std=0), "positive 'std'"),
        (lambda m: m.update(labels={"background": 0, "kidney": 2, "tumor": 1}), "kidney = 1"),
        (lambda m: m.update(trained="yes"), "'trained' must be a bool"),
        (lambda m: m.pop("name"), "metadata has no 'name'"),
        (lambda m: m["architecture"]["config"].update(output_stride=5), "output_stride must be 8 or 16"),
        (lambda m: m["architecture"]["config"].update(depth=3), "unknown architecture parameter"),
    ],
)
def test_invalid_metadata_is_refused_with_the_field_named(model_path, tmp_path, edit, message):
    bad = _rewrite(model_path, tmp_path / "bad.safetensors", edit_meta=edit)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(bad)
    assert str(bad) in str(info.value)


def test_wrong_tensor_shape_is_named(model_path, tmp_path):
    def shrink(state):
        state["classifier.weight"] = state["classifier.weight"][:2].contiguous()

    bad = _rewrite(model_path, tmp_path / "bad.safetensors", edit_state=shrink)
    with pytest.raises(ModelFileError, match=r"classifier.weight is \[2, 8, 1, 1, 1\], expected \[3, 8, 1, 1, 1\]"):
        load_model(bad)


def test_missing_and_extra_tensors_are_named(model_path, tmp_path):
    def rename(state):
        state["classifier.weights"] = state.pop("classifier.weight")

    bad = _rewrite(model_path, tmp_path / "bad.safetensors", edit_state=rename)
    with pytest.raises(ModelFileError, match="missing .*classifier.weight.*unexpected .*classifier.weights"):
        load_model(bad)


def test_truncated_file_is_refused(model_path, tmp_path):
    data = model_path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|not a safetensors|not a model file"):
            load_model(bad)


def test_garbage_file_is_refused(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 50)
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(bad)


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "disguised.safetensors"])
def test_pickles_are_refused_without_being_unpickled(tmp_path, name):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / name
    torch.save({"weights": torch.zeros(2), "payload": Evil()}, path)
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(path)
    assert not marker.exists()


def test_plain_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ModelFileError, match="without KidneyTumorSeg metadata"):
        read_metadata(path)


def test_registry_default_model_resolves_and_verifies_its_checksum():
    entries = read_registry()
    default = next(e for e in entries if e.default)
    path = resolve_model(None)
    assert path.name == default.file
    assert sha256_of(path) == default.sha256
    loaded = load_model(path)
    assert loaded.metadata.name == default.name
    assert loaded.metadata.trained == default.trained


def test_registry_checksum_mismatch_is_refused(tmp_path, model_path):
    registry = json.loads(registry_path().read_text())
    entry = registry["models"][0]
    (tmp_path / entry["file"]).write_bytes(model_path.read_bytes())  # not the published file
    (tmp_path / "models.json").write_text(json.dumps(registry))
    with pytest.raises(ModelFileError, match="SHA-256 .* does not match"):
        resolve_model(entry["name"], registry=tmp_path / "models.json")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelFileError, match="known: kidneytumorseg-phantom"):
        resolve_model("no-such-model")


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _entry(url: str, data: bytes):
    import hashlib

    from KidneyTumorSegLib.modelfile import RegistryEntry

    return RegistryEntry(
        name="remote",
        version="1.0",
        sha256=hashlib.sha256(data).hexdigest(),
        file=None,
        url=url,
        labels={"background": 0, "kidney": 1, "tumor": 2},
        description="",
        license="",
        intended_use="",
        trained=True,
        default=False,
    )


def test_a_registry_model_downloads_once_into_the_user_cache_with_progress(tmp_path, monkeypatch, model_path):
    from KidneyTumorSegLib.modelfile import fetch_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = model_path.read_bytes()
    calls, seen = [], []

    def opener(url, timeout):
        calls.append(url)
        return _FakeResponse(data)

    entry = _entry("https://models.example/remote.safetensors", data)
    path = fetch_model(entry, progress=lambda done, total: seen.append((done, total)), opener=opener)
    assert path.read_bytes() == data and path.parent == tmp_path / "cache" / "kidneytumorseg" / "models"
    assert seen[-1] == (len(data), len(data))
    assert fetch_model(entry, opener=opener) == path and len(calls) == 1  # cached: no second download
    assert load_model(path).metadata.config == TINY


def test_a_download_with_the_wrong_checksum_is_deleted_and_reported(tmp_path, monkeypatch, model_path):
    from KidneyTumorSegLib.modelfile import fetch_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    entry = _entry("https://models.example/remote.safetensors", b"the published bytes")
    with pytest.raises(ModelFileError, match="SHA-256 .* not the registry's .* it was deleted"):
        fetch_model(entry, opener=lambda url, timeout: _FakeResponse(model_path.read_bytes()))
    assert not any((tmp_path / "cache").rglob("*safetensors*"))


def test_downloads_only_over_https_and_network_failures_leave_nothing(tmp_path, monkeypatch):
    from KidneyTumorSegLib.modelfile import fetch_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError, match="not https"):
        fetch_model(_entry("http://models.example/m.safetensors", b"x"), opener=lambda url, timeout: None)

    def offline(url, timeout):
        raise OSError("Network is unreachable")

    with pytest.raises(ModelFileError, match="download .* failed .*Network is unreachable.*download the file yourself"):
        fetch_model(_entry("https://models.example/m.safetensors", b"x"), opener=offline)
    assert not any((tmp_path / "cache").rglob("*safetensors*"))
