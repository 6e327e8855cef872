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


def test_installed_transformers_is_within_the_tested_bounds_of_setup_cfg():
    import configparser
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    reqs = [Requirement(line.strip()) for line in cfg["options"]["install_requires"].splitlines()
            if line.strip() and not line.strip().startswith("#")]
    (spec,) = [r.specifier for r in reqs if r.name == "transformers"]
    assert any(s.operator == "<" for s in spec), "transformers needs a tested upper bound"
    assert spec.contains(transformers.__version__), (transformers.__version__, str(spec))
