"""Tests of key styles (``extract/keys/``): diffusers/PEFT names, text-encoder names."""
