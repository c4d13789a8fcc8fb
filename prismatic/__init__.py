"""The OpenVLA side of the project: models, data and the training loop."""

from prismatic.util.torch_compat import ensure_torchvision_importable

ensure_torchvision_importable()
