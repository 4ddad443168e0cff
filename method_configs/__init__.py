"""nerfstudio method specifications of vqad-nerfstudio, one module per registered method.

Installed as ``vqad_nerfstudio.method_configs``.
"""
