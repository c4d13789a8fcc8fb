"""Make timm importable next to a torchvision wheel whose compiled ops do not match torch.

timm imports torchvision at import time. When torchvision's C++ library fails to load (a CUDA
torchvision beside a CPU torch), its Python side still registers fake kernels for `nms`/`qnms`,
which raises because the operator schemas were never defined. Defining the two schemas first lets
the import succeed; only torchvision's compiled detection ops are then missing, and nothing here
uses them. With a matching torch/torchvision pair this is a no-op.
"""

import importlib.util

import torch

_fragment = None  # kept alive for the process: dropping it would unregister the schemas


def ensure_torchvision_importable() -> None:
    global _fragment
    if _fragment is not None or importlib.util.find_spec("torchvision") is None:
        return
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU"):
            return
    except RuntimeError:
        pass
    spec = importlib.util.find_spec("torchvision")
    try:
        import glob
        import os

        libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
        if libs:
            torch.ops.load_library(libs[0])
            return
    except (OSError, RuntimeError):
        pass
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor scale, Tensor zero_point) -> Tensor"
    )
