"""README.md's PEFT tables are the output of scripts/method_table.py (so they cannot go stale)."""


from samft import peft

from conftest import ROOT, load_script


def _script():
    return load_script("method_table")


def test_readme_holds_the_generated_method_tables():
    script = _script()
    text = script.table()
    for name in peft.all_methods():
        assert f"| `{name}` |" in text
    assert "| `conv_lora` | Conv-LoRA" in text and "4,020,096" in text  # the paper's 4.02M on ViT-H
    assert "| `sam_adapter` | refused | refused | refused | refused |" in text  # SAM 2.1's table, computed
    assert "| `decoder_only` | 0 / 3,530,464 (3.530M) |" in text
    assert script.readme_block(ROOT / "README.md") == text, \
        "README.md is stale: run python scripts/method_table.py --update README.md"
