"""Class-conditional image generation: sampling, self-generated calibration, the embedded digits model."""
