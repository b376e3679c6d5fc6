"""Acquisition: frame sources (``sources``), the synthetic tunnel drive (``synth``) and the stage
that stamps frames and sends them to inference (``service``)."""
