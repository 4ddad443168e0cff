"""Tests for the embedded demo scene (vqad_nerfstudio.demo)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqad_nerfstudio.demo import cli
from vqad_nerfstudio.demo.scene import (
    PRIMITIVES,
    SCENE_RADIUS,
    DemoSceneConfig,
    demo_camera_poses,
    render_demo_view,
    to_uint8,
    write_demo_scene,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = DemoSceneConfig(resolution=32, num_train=6, num_eval=3, supersample=1, seed=3)
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image).copy()


def _meta(scene_dir: Path) -> dict:
    return json.loads((scene_dir / "transforms.json").read_text())


@pytest.fixture(scope="module")
def default_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene exactly as ``vqad-demo-scene <dir>`` writes it by default."""
    out = tmp_path_factory.mktemp("default") / "scene"
    assert write_demo_scene(out, DemoSceneConfig(), show_progress=False) == out
    return out


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "scene"
    write_demo_scene(out, SMALL, show_progress=False)
    return out


@pytest.fixture(scope="module")
def parsed_default(default_scene: Path) -> dict:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    parser = NerfstudioDataParserConfig(data=default_scene).setup()
    return {split: parser.get_dataparser_outputs(split) for split in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------


def test_writes_expected_files(default_scene: Path) -> None:
    config = DemoSceneConfig()
    assert sorted(p.name for p in default_scene.iterdir()) == ["images", "scene.json", "transforms.json"]
    train = [f"images/train_{i:03d}.png" for i in range(config.num_train)]
    evals = [f"images/eval_{i:03d}.png" for i in range(config.num_eval)]
    written = sorted(p.name for p in (default_scene / "images").iterdir())
    assert written == sorted(Path(p).name for p in train + evals)

    meta = _meta(default_scene)
    assert meta["camera_model"] == "OPENCV"
    assert meta["w"] == meta["h"] == 96
    assert meta["cx"] == meta["cy"] == 48.0
    assert meta["fl_x"] == meta["fl_y"] == pytest.approx(config.focal_length)
    assert [f["file_path"] for f in meta["frames"]] == train + evals
    assert meta["train_filenames"] == train
    assert meta["val_filenames"] == evals
    assert meta["test_filenames"] == evals
    for frame in meta["frames"]:
        c2w = np.array(frame["transform_matrix"])
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
        np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)
        # OpenGL convention: the camera looks down -Z, i.e. towards the origin.
        position = c2w[:3, 3]
        assert np.linalg.norm(position) == pytest.approx(config.radius)
        np.testing.assert_allclose(-c2w[:3, 2], -position / np.linalg.norm(position), atol=1e-12)

    for name in (train[0], evals[-1]):
        image = _load_png(default_scene / name)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8

    scene = json.loads((default_scene / "scene.json").read_text())
    assert scene["format"] == "vqad-demo-scene"
    assert [p["name"] for p in scene["primitives"]] == [p.name for p in PRIMITIVES]
    assert scene["generator"]["num_train"] == config.num_train


def test_images_look_like_the_scene(default_scene: Path) -> None:
    image = _load_png(default_scene / "images/train_020.png").astype(np.int64)
    corners = np.concatenate([image[:3, :3].reshape(-1, 3), image[-3:, -3:].reshape(-1, 3)])
    assert (corners == 255).all(), "background must be white"
    background = (image == 255).all(axis=-1).mean()
    assert 0.3 < background < 0.9, "the solids should fill a good part of the frame"
    # Strongly red, green and blue pixels (the balls and the column) are all visible.
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    assert ((r > g + 60) & (r > b + 60)).sum() > 20
    assert ((g > r + 40) & (g > b + 40)).sum() > 20
    assert ((b > r + 60) & (b > g + 60)).sum() > 5
    # The object lies within the frame: the image border is background.
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (border == 255).all()


# ---------------------------------------------------------------------------------------------
# nerfstudio's own parser
# ---------------------------------------------------------------------------------------------


def test_nerfstudio_parser_loads_splits(default_scene: Path, parsed_default: dict) -> None:
    config = DemoSceneConfig()
    expected = {"train": config.num_train, "val": config.num_eval, "test": config.num_eval}
    for split, outputs in parsed_default.items():
        assert len(outputs.image_filenames) == expected[split]
        assert len(outputs.cameras) == expected[split]
        assert (outputs.cameras.width == 96).all() and (outputs.cameras.height == 96).all()
        assert all(Path(f).exists() for f in outputs.image_filenames)
    names = lambda split: [Path(f).name for f in parsed_default[split].image_filenames]  # noqa: E731
    assert all(n.startswith("train_") for n in names("train"))
    assert names("val") == names("test") and all(n.startswith("eval_") for n in names("val"))

    from nerfstudio.data.datasets.base_dataset import InputDataset

    image = InputDataset(parsed_default["train"])[0]["image"]
    assert tuple(image.shape) == (96, 96, 3)


def test_object_inside_scene_box_after_normalisation(parsed_default: dict) -> None:
    outputs = parsed_default["train"]
    transform = outputs.dataparser_transform.numpy().astype(np.float64)  # 3x4, saved -> output coords
    scale = outputs.dataparser_scale
    aabb = outputs.scene_box.aabb.numpy()
    np.testing.assert_allclose(aabb, [[-1, -1, -1], [1, 1, 1]])

    def to_output(points: np.ndarray) -> np.ndarray:
        return scale * (points @ transform[:, :3].T + transform[:, 3])

    # Every point of the bounding sphere of the solids lands well inside the box.
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(2000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sphere = to_output(SCENE_RADIUS * directions)
    assert np.abs(sphere).max() < 0.3
    # Up stays up: the blue ball on top of the column is above the plinth.
    top, bottom = to_output(np.array([[0.15, 0.10, 0.33], [0.0, 0.0, -0.35]]))
    assert top[2] - bottom[2] > 0.9 * scale * 0.68
    # Cameras end up on nerfstudio's unit scale: the largest coordinate is 1, radius about 1.
    for split in ("train", "val"):
        positions = parsed_default[split].cameras.camera_to_worlds[:, :3, 3].numpy()
        assert np.abs(positions).max() <= 1.0 + 1e-5
        assert np.linalg.norm(positions, axis=1).max() < 1.05


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def test_rendering_is_deterministic(small_scene: Path, tmp_path: Path) -> None:
    train, _ = demo_camera_poses(SMALL)
    first = render_demo_view(train[0], **SMALL.intrinsics())
    second = render_demo_view(train[0], **SMALL.intrinsics())
    assert first.shape == (32, 32, 3) and first.dtype == np.float64
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)

    again = write_demo_scene(tmp_path / "again", SMALL, show_progress=False)
    written = sorted(p.relative_to(small_scene) for p in small_scene.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in written:
        assert (small_scene / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_eval_views_are_new_and_train_views_reproduce(small_scene: Path) -> None:
    meta = _meta(small_scene)
    intrinsics = {key: meta[key] for key in INTRINSIC_KEYS}
    frames = {f["file_path"]: np.array(f["transform_matrix"]) for f in meta["frames"]}
    train = {name: _load_png(small_scene / name) for name in meta["train_filenames"]}
    evals = {name: _load_png(small_scene / name) for name in meta["val_filenames"]}
    for eval_name, eval_image in evals.items():
        for train_name, train_image in train.items():
            assert not np.allclose(frames[eval_name][:3, 3], frames[train_name][:3, 3])
            assert not np.array_equal(eval_image, train_image), (eval_name, train_name)
    # Re-rendering a train camera from transforms.json reproduces its PNG exactly.
    for name in (meta["train_filenames"][0], meta["train_filenames"][-1]):
        rendered = render_demo_view(frames[name], supersample=SMALL.supersample, **intrinsics)
        np.testing.assert_array_equal(to_uint8(rendered), train[name])


def test_textured_background_surrounds_the_solids_with_detail() -> None:
    """The textured dome replaces the white background and varies across the image; the solids stay the same."""
    pose = demo_camera_poses(SMALL)[0][0]
    white = render_demo_view(pose, supersample=1, **SMALL.intrinsics())
    textured = render_demo_view(pose, supersample=1, background="textured", **SMALL.intrinsics())
    background = (white == 1.0).all(axis=-1)
    assert 0.2 < background.mean() < 0.95
    assert np.array_equal(white[~background], textured[~background])
    assert textured[background].std(axis=0).min() > 0.05  # not one flat colour
    assert not (textured[background] == 1.0).all(axis=-1).any()


def _dome_points_seen_twice(config: DemoSceneConfig) -> float:
    """Share of the dome that the eval views see which at least two training views also see (unoccluded)."""
    from vqad_nerfstudio.demo.scene import DOME_RADIUS, _closest_hit

    train, evals = demo_camera_poses(config)
    k = config.intrinsics()
    pixels = (np.arange(k["w"]) + 0.5 - k["cx"]) / k["fl_x"]
    u, v = np.meshgrid(pixels, pixels)
    camera_dirs = np.stack([u, -v, -np.ones_like(u)], axis=-1).reshape(-1, 3)
    shares = []
    for pose in evals:
        dirs = camera_dirs @ pose[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = np.broadcast_to(pose[:3, 3], dirs.shape).copy()
        dirs = dirs[_closest_hit(origins, dirs)[2] < 0]  # background pixels
        b = dirs @ pose[:3, 3]
        points = pose[:3, 3] + (-b + np.sqrt(b**2 - pose[:3, 3] @ pose[:3, 3] + DOME_RADIUS**2))[:, None] * dirs
        seen = np.zeros(len(points), dtype=int)
        for camera in train:
            local = (points - camera[:3, 3]) @ camera[:3, :3]
            depth = -local[:, 2]
            in_front = depth > 0
            x = local[:, 0] / np.where(in_front, depth, 1.0) * k["fl_x"] + k["cx"]
            y = -local[:, 1] / np.where(in_front, depth, 1.0) * k["fl_y"] + k["cy"]
            rays = (points - camera[:3, 3]) / np.linalg.norm(points - camera[:3, 3], axis=1, keepdims=True)
            unoccluded = _closest_hit(np.broadcast_to(camera[:3, 3], rays.shape).copy(), rays)[2] < 0
            seen += in_front & (0 <= x) & (x < k["w"]) & (0 <= y) & (y < k["h"]) & unoccluded
        shares.append(np.mean(seen >= 2))
    return float(np.mean(shares))


def test_the_textured_dome_is_seen_from_several_training_views() -> None:
    """An unbounded demo scene can only be fitted where its background has parallax between training views."""
    textured = DemoSceneConfig(resolution=24, num_train=80, num_eval=8, supersample=1, background="textured")
    assert (textured.radius, textured.field_of_view) == (1.4, 60.0)
    assert _dome_points_seen_twice(textured) > 0.95
    narrow = dataclasses.replace(textured, camera_radius=2.6, fov_degrees=28.0)  # the white scene's cameras
    assert _dome_points_seen_twice(narrow) < 0.8
    assert (DemoSceneConfig().radius, DemoSceneConfig().field_of_view) == (2.6, 28.0)


def test_solids_lie_inside_the_scene_radius() -> None:
    for primitive in PRIMITIVES:
        assert primitive.bounding_radius() <= SCENE_RADIUS, primitive.name


def test_camera_sets_are_distinct_for_default_config() -> None:
    train, evals = demo_camera_poses(DemoSceneConfig())
    t_dirs = train[:, :3, 3] / np.linalg.norm(train[:, :3, 3], axis=1, keepdims=True)
    e_dirs = evals[:, :3, 3] / np.linalg.norm(evals[:, :3, 3], axis=1, keepdims=True)
    assert (e_dirs @ t_dirs.T).max() < np.cos(np.radians(1.0))
    # Both sets cover the whole sphere, so their mean is near the origin (nerfstudio centres on it).
    assert np.linalg.norm(np.concatenate([train, evals])[:, :3, 3].mean(axis=0)) < 0.05


# ---------------------------------------------------------------------------------------------
# Overwriting and validation
# ---------------------------------------------------------------------------------------------


def test_refuses_non_empty_directory_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "scene"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*overwrite"):
        write_demo_scene(out, SMALL, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    bigger = DemoSceneConfig(resolution=16, num_train=4, num_eval=2, supersample=1)
    write_demo_scene(out, bigger, overwrite=True, show_progress=False)
    smaller = DemoSceneConfig(resolution=16, num_train=2, num_eval=1, supersample=1)
    write_demo_scene(out, smaller, overwrite=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["eval_000.png", "train_000.png", "train_001.png"]
    assert len(_meta(out)["frames"]) == 3

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_demo_scene(a_file, SMALL, overwrite=True, show_progress=False)


def test_empty_existing_directory_is_fine(tmp_path: Path) -> None:
    write_demo_scene(tmp_path, DemoSceneConfig(resolution=16, num_train=1, num_eval=1), show_progress=False)
    assert (tmp_path / "transforms.json").is_file()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resolution": 8}, "resolution must be at least 16"),
        ({"resolution": 32.5}, "resolution must be an integer"),
        ({"num_train": 0}, "num_train must be at least 1"),
        ({"num_eval": 0}, "num_eval must be at least 1"),
        ({"supersample": 0}, "supersample must be at least 1"),
        ({"camera_radius": 0.5}, "camera_radius must be a number greater than"),
        ({"fov_degrees": 0.0}, "fov_degrees must be a number between"),
        ({"background": "grey"}, "background must be 'white' or 'textured'"),
        ({"background": "textured", "camera_radius": 15.0}, "camera_radius must stay below"),
    ],
)
def test_bad_config_values_raise(tmp_path: Path, changes: dict, message: str) -> None:
    config = DemoSceneConfig(**changes)
    with pytest.raises(ValueError, match=message):
        config.validate()
    with pytest.raises(ValueError, match=message):
        write_demo_scene(tmp_path / "out", config, show_progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_writes_scene_and_prints_next_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    cli.main([str(out), "--resolution", "16", "--num-train", "3", "--num-eval", "1", "--supersample", "1"])
    stdout = capsys.readouterr().out
    assert f"ns-train vqad --data {out}\n" in stdout
    assert len(_meta(out)["train_filenames"]) == 3
    dome = tmp_path / "dome"
    cli.main([str(dome), "--resolution", "16", "--num-train", "1", "--num-eval", "1", "--background", "textured"])
    assert f"ns-train vqad --data {dome}\n" in capsys.readouterr().out  # its bounds are found in its images
    generator = json.loads((dome / "scene.json").read_text())["generator"]
    assert (generator["camera_radius"], generator["fov_degrees"]) == (1.4, 60.0)  # the textured scene's cameras
    transforms = _meta(dome)
    assert np.linalg.norm(np.array(transforms["frames"][0]["transform_matrix"])[:3, 3]) == pytest.approx(1.4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "8"], "resolution must be at least 16"),
        (["--num-train", "0"], "num_train must be at least 1"),
    ],
)
def test_cli_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_directory_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-m", "vqad_nerfstudio.demo.cli", str(tmp_path), "--resolution", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not empty" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]


def test_pixels_match_nerfstudio_rays(small_scene: Path) -> None:
    """nerfstudio's rays for a pixel (camera conventions, pixel centres, y flip) see that pixel's colour."""
    import torch
    from nerfstudio.cameras.cameras import Cameras, CameraType

    from vqad_nerfstudio.demo.scene import _shade_rays

    meta = _meta(small_scene)
    frame = meta["frames"][1]
    c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)[:3, :4]
    camera = Cameras(
        camera_to_worlds=c2w[None].float(),
        fx=meta["fl_x"],
        fy=meta["fl_y"],
        cx=meta["cx"],
        cy=meta["cy"],
        width=meta["w"],
        height=meta["h"],
        camera_type=CameraType.PERSPECTIVE,
    )
    rays = camera.generate_rays(camera_indices=0)
    origins = rays.origins.reshape(-1, 3).double().numpy()
    dirs = rays.directions.reshape(-1, 3).double().numpy()
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    colours = _shade_rays(origins, dirs).reshape(meta["h"], meta["w"], 3)
    png = _load_png(small_scene / frame["file_path"]).astype(np.int64)
    mismatch = np.abs(to_uint8(colours).astype(np.int64) - png).max(axis=-1) > 2
    # float32 rays may flip a handful of silhouette pixels, nothing more.
    assert mismatch.mean() < 0.01
