"""The recipes (train, audit, causal LM) put the model on the device the Trainer trains this process on
(``args.device``: cuda:LOCAL_RANK under torchrun), never on a bare ``"cuda"`` (GPU 0 in every process)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hf_ewtune
from hf_ewtune.recipes import models
from hf_ewtune.testing import tiny_bert


class _Placed(Exception):
    pass


def test_to_training_device_uses_the_trainer_device():
    model = tiny_bert()
    assert models.to_training_device(model, SimpleNamespace(device=torch.device("cpu"))) is model
    moved = models.to_training_device(model, SimpleNamespace(device=torch.device("meta")))
    assert {p.device.type for p in moved.parameters()} == {"meta"}


@pytest.mark.parametrize("runner", ["audit", "text_classification"])
def test_the_recipes_place_the_model_on_args_device(tmp_path, monkeypatch, runner):
    from hf_ewtune.recipes.text_classification import TextClassificationConfig

    seen = []

    def spy(model, args):
        seen.append(args.device)
        raise _Placed

    monkeypatch.setattr(models, "to_training_device", spy)
    config = TextClassificationConfig(output_dir=str(tmp_path), smoke=True)
    with pytest.raises(_Placed):
        if runner == "audit":
            from hf_ewtune.audit.recipe import audit_text_classification

            audit_text_classification(config=config)
        else:
            import hf_ewtune.recipes.text_classification as tc

            monkeypatch.setattr(tc, "to_training_device", spy)
            tc.run_text_classification(config=config)
    assert seen and isinstance(seen[0], torch.device)


def test_no_bare_cuda_placement_is_left_in_the_package():
    root = Path(hf_ewtune.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if '.to("cuda")' in p.read_text(encoding="utf-8") or ".to('cuda')" in p.read_text(encoding="utf-8")]
    assert offenders == []
