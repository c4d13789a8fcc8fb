"""The OpenVLA side of the project: models, data and the training loop."""
