"""The one-way house: each layer imports only what lies below it (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdbatch"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


RULES = [  # (files, imports they must not make)
    ("models/*.py", ("sdbatch.schema", "sdbatch.prompts", "sdbatch.output", "sdbatch.run",
                     "sdbatch.matrix", "sdbatch.plan")),
    ("output/*.py", ("sdbatch.models.hashing", "sdbatch.models.embeddings",
                     "sdbatch.models.lora", "sdbatch.executors", "sdbatch.stages")),
    ("schema.py", ("sdbatch.samplers", "sdbatch.stages", "sdbatch.models", "torch",
                   "diffusers")),
    ("stages/*.py", ("sdbatch.run", "sdbatch.output", "sdbatch.executors", "sdbatch.schema")),
    # what reads a run folder only; verify.py renders again, through run and the executors
    *((f"reports/{name}.py", ("sdbatch.run", "sdbatch.executors", "sdbatch.stages",
                              "sdbatch.models", "torch", "diffusers"))
      for name in ("grids", "listing", "gallery", "compare", "diff")),
]


@pytest.mark.parametrize("pattern, banned", RULES)
def test_layers_import_only_downward(pattern, banned):
    for path in PACKAGE.glob(pattern):
        bad = sorted(m for m in imports(path) for b in banned if m == b or m.startswith(b + "."))
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
