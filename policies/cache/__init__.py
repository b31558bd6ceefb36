"""Cache policies: where each expert should be (VRAM / RAM / disk). See `base.py`."""
