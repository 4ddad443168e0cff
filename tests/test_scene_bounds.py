"""A run's scene bounds decided from its training images: captures with a background train unbounded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vqad_nerfstudio.method_configs.vqad import vqad

from vqad_nerfstudio.data.scene_bounds import FLAT_BORDER_SHARE, border_pixels, flat_border_share
from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene
from vqad_nerfstudio.pipeline import decide_scene_bounds


def _write(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


def _object_on(backdrop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 40 x 40 image: a textured object in its middle, ``backdrop`` (40 x 40 x C) around it."""
    image = backdrop.copy()
    image[10:30, 10:30, :3] = rng.random((20, 20, 3))
    if image.shape[2] == 4:
        image[10:30, 10:30, 3] = 1.0
    return image


def test_border_pixels_are_the_outer_ring():
    image = np.zeros((64, 96, 1), np.float32)
    image[2:-2, 2:-2] = 1.0  # a ring of 2 pixels (min(64, 96) // 32) stays 0
    ring = border_pixels(image)
    assert len(ring) == 64 * 96 - 60 * 92 and not ring.any()


def test_flat_and_transparent_borders_are_object_scenes_and_textured_ones_are_not(tmp_path):
    rng = np.random.default_rng(0)
    white = np.ones((40, 40, 3), np.float32)
    noisy_white = np.clip(white - rng.random((40, 40, 3)) * 0.06, 0, 1)  # JPEG noise on a white backdrop
    transparent = np.zeros((40, 40, 4), np.float32)
    textured = rng.random((40, 40, 3)).astype(np.float32)
    for name, backdrop, flat in (
        ("white", white, True),
        ("noisy", noisy_white, True),
        ("rgba", transparent, True),
        ("textured", textured, False),
    ):
        paths = [_write(tmp_path / f"{name}{i}.png", _object_on(backdrop, rng)) for i in range(3)]
        assert (flat_border_share(paths) >= FLAT_BORDER_SHARE) == flat, name


def test_no_images_are_refused():
    with pytest.raises(ValueError, match="no training images"):
        flat_border_share([])


def _config(data: Path, **model):
    config = copy.deepcopy(vqad.config)
    config.pipeline.datamanager.data = data
    for name, value in model.items():
        setattr(config.pipeline.model, name, value)
    return config


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    """The demo scene on white and inside its textured dome (nerfstudio format), and a Blender-format scene."""
    root = tmp_path_factory.mktemp("bounds")
    demo = {
        background: write_demo_scene(
            root / background,
            DemoSceneConfig(resolution=24, num_train=4, num_eval=1, supersample=1, background=background),
            show_progress=False,
        )
        for background in ("white", "textured")
    }
    blender = root / "blender"
    (blender / "train").mkdir(parents=True)
    rng = np.random.default_rng(1)
    frames = []
    for i in range(2):
        _write(blender / "train" / f"r_{i}.png", _object_on(np.zeros((40, 40, 4), np.float32), rng))
        pose = np.eye(4)
        pose[2, 3] = 4.0
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": pose.tolist()})
    (blender / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return {**demo, "blender": blender}


@pytest.mark.parametrize("scene, unbounded", [("white", False), ("textured", True)])
def test_the_default_is_decided_from_the_images(scenes, scene, unbounded, capsys):
    config = _config(scenes[scene])
    assert config.pipeline.model.unbounded is None
    decide_scene_bounds(config.pipeline)
    assert config.pipeline.model.unbounded is unbounded
    said = capsys.readouterr().out
    assert ("show a background" in said) == unbounded and ("--pipeline.model.unbounded" in said)


def test_a_blender_scene_through_its_parser_is_bounded(scenes):
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    config = _config(None)
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig(data=scenes["blender"])
    decide_scene_bounds(config.pipeline)
    assert config.pipeline.model.unbounded is False


@pytest.mark.parametrize("given", [True, False])
def test_a_given_setting_is_kept(scenes, given, capsys):
    config = _config(scenes["textured" if not given else "white"], unbounded=given)
    decide_scene_bounds(config.pipeline)
    assert config.pipeline.model.unbounded is given and capsys.readouterr().out == ""


def test_a_background_cap_on_an_object_scene_is_refused(scenes, capsys):
    config = _config(scenes["white"], shell_lod=1)
    with pytest.raises(SystemExit):
        decide_scene_bounds(config.pipeline)
    assert "shell_lod caps the background" in capsys.readouterr().err


def test_a_missing_image_fails_in_one_line(scenes, tmp_path, capsys):
    scene = tmp_path / "scene"
    scene.mkdir()
    transforms = json.loads((scenes["textured"] / "transforms.json").read_text())
    (scene / "transforms.json").write_text(json.dumps(transforms))  # the images stay behind
    with pytest.raises(SystemExit):
        decide_scene_bounds(_config(scene).pipeline)
    assert "cannot read the data" in capsys.readouterr().err


def test_a_transforms_file_without_frames_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "transforms.json").write_text("{}")
    with pytest.raises(SystemExit):
        decide_scene_bounds(_config(tmp_path).pipeline)
    assert "cannot read the data's cameras and images: KeyError" in capsys.readouterr().err


def test_the_run_config_records_the_decision(scenes, tmp_path):
    config = _config(scenes["textured"])
    config.output_dir, config.timestamp = tmp_path / "out", "t"
    config.save_config()
    assert "unbounded: true" in (config.get_base_dir() / "config.yml").read_text()


@pytest.mark.parametrize("scene, contracted", [("white", False), ("textured", True)])
def test_the_hash_methods_decide_their_scene_contraction_from_the_images(scenes, scene, contracted, capsys):
    from vqad_nerfstudio.method_configs.vqad_hash import vqad_hash

    config = copy.deepcopy(vqad_hash.config)
    config.pipeline.datamanager.data = scenes[scene]
    assert config.pipeline.model.disable_scene_contraction is None and config.pipeline.model.unbounded is None
    decide_scene_bounds(config.pipeline)
    assert config.pipeline.model.disable_scene_contraction is (not contracted)
    assert "--pipeline.model.disable-scene-contraction" in capsys.readouterr().out


def test_a_hash_model_built_without_the_decision_keeps_to_the_box():
    import torch
    from nerfstudio.data.scene_box import SceneBox
    from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

    config = hash_model_config("learned", 8)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert model.field.spatial_distortion is None and config.disable_scene_contraction is True
    config.disable_scene_contraction = False
    contracted = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert contracted.field.spatial_distortion is not None
