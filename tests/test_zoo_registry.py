import pytest
import torch.nn as nn

import zoo


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown zoo model 'no_such_net'; valid names"):
        zoo.create("no_such_net")


def test_register_and_create(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", {})

    @zoo.register("tiny_linear")
    def tiny_linear(num_classes=1000):
        return nn.Linear(4, num_classes)

    assert zoo.names() == ["tiny_linear"]
    assert zoo.create("tiny_linear", num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="registered twice"):
        zoo.register("tiny_linear")(tiny_linear)


def test_zoo_holds_training_form_only():
    """Inference form comes from reparam_fx.fuse alone: no file in zoo/ carries
    deploy-time code (reparameterize methods, deploy switches, reparam convs)."""
    from pathlib import Path
    forbidden = ("reparameterize", "switch_to_deploy", "inference_mode", "deploy",
                 "reparam_conv", "def fuse")
    files = sorted(Path(zoo.__file__).parent.glob("*.py"))
    assert files
    for path in files:
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"zoo/{path.name} contains {word!r}"
