"""README.md's PEFT tables are the output of scripts/method_table.py (so they cannot go stale)."""

import importlib.util

from samft import peft

from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("method_table", ROOT / "scripts" / "method_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_holds_the_generated_method_tables():
    script = _script()
    text = script.table()
    for name in peft.all_methods():
        assert f"| `{name}` |" in text
    assert "| `conv_lora` | Conv-LoRA" in text and "4,020,096" in text  # the paper's 4.02M on ViT-H
    assert script.readme_block(ROOT / "README.md") == text, \
        "README.md is stale: run python scripts/method_table.py --update README.md"
