"""CRaFT: behaviour-cloning fine-tuning under an explicit budget on representation drift.

Depends on torch and numpy only; the trainer in `prismatic.training` composes it with the model
and the data pipeline.
"""
