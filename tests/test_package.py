import subprocess
import sys

import hf_ewtune


def test_lazy_exports_resolve():
    for name in hf_ewtune._LAZY:
        assert getattr(hf_ewtune, name) is not None, name
    assert hf_ewtune.DPTrainer.__mro__[1].__name__ == "Trainer"


def test_import_is_light():
    code = "import sys, hf_ewtune, hf_ewtune.accounting; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
