"""Imports kohya's library/model_util.py from an sd-scripts checkout for fixture scripts.

Usage: KOHYA_SD_SCRIPTS=/path/to/sd-scripts (a plain checkout or `git archive HEAD library | tar -x`).
Modules kohya imports but the key conversion never uses (torchvision, ...) are stubbed, so only
torch, diffusers and transformers need to be installed (tools/.venv has them).
"""
import os
import sys
import types


def _stub(name, **attrs):
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def load_model_util():
    root = os.environ.get("KOHYA_SD_SCRIPTS", "/tmp/sdscripts")
    sys.path.insert(0, root)
    for missing in ["torchvision", "torchvision.transforms"]:
        try:
            __import__(missing)
        except ImportError:
            tv = _stub("torchvision")
            tv.transforms = _stub("torchvision.transforms")
    from library import model_util  # noqa: E402

    return model_util
