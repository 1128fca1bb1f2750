"""Perception (slot encoders, quantizer, decoders), metrics and pretraining; the slot-token dynamics and world model
(train-wm); configs, run directories, torchrun support and benchmarks."""
