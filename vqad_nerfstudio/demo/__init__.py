"""Built-in demo scene: a small synthetic scene rendered from analytic solids, in nerfstudio's data format.

Write it with ``vqad-demo-scene <dir>`` (or :func:`write_demo_scene`) and train with
``ns-train vqad --data <dir>``; nothing is downloaded.
"""

from vqad_nerfstudio.demo.scene import (
    SCENE_RADIUS,
    DemoSceneConfig,
    demo_camera_poses,
    render_demo_view,
    write_demo_scene,
)

__all__ = [
    "SCENE_RADIUS",
    "DemoSceneConfig",
    "demo_camera_poses",
    "render_demo_view",
    "write_demo_scene",
]
