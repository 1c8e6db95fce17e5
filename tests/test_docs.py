"""The docs cannot drift from the code: generated pages are up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_generated_from_the_settings() -> None:
    spec = importlib.util.spec_from_file_location("gen_config", DOCS / "gen_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (DOCS / "configuration.md").read_text()
    assert current == module.render(), "run: python docs/gen_config.py"
