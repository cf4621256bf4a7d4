"""Checks on a real CUDA GPU (run by ``tests/gpu/run_on_device.sh``; skipped without one)."""
