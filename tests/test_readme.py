"""The README's Python examples run as written."""
import argparse
import re
from pathlib import Path

import torch

from mrm import MRM, ViT

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its examples"
    # the weight-loading example reads the two official files: stand-ins with their layout
    monkeypatch.chdir(tmp_path)
    encoder = ViT().state_dict()
    torch.save({"model": encoder, "args": argparse.Namespace(model="mae_vit_base_patch16")},
               "mae_pretrain_vit_base.pth")
    torch.save({"model": {**encoder, **MRM().image_decoder.state_dict()}}, "MRM.pth")
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
