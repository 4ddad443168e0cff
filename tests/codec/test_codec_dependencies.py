"""The codec must stay readable with only the standard library, numpy and constriction."""

import ast
import pathlib
import subprocess
import sys

import vqad_nerfstudio.codec

CODEC_DIR = pathlib.Path(vqad_nerfstudio.codec.__file__).parent
ALLOWED = {"numpy", "constriction"}


def test_codec_imports_only_stdlib_numpy_and_constriction():
    for path in sorted(CODEC_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import: must stay inside codec/
                    assert node.level == 1, f"{path.name}: import reaches outside codec/"
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots:
                assert root in ALLOWED or root in sys.stdlib_module_names or root == "__future__", (
                    f"{path.name} imports {root}"
                )


def test_importing_the_codec_loads_no_framework():
    code = (
        "import sys, vqad_nerfstudio.codec as c, numpy as np;"
        "c.decode_categorical(c.encode_categorical(np.arange(5), 8));"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nerfstudio'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CODEC_DIR.parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
