"""Perception (slot encoders, quantizer, decoders), metrics and pretraining."""
