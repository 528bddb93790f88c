"""Identity leakage and interpolation: face evidence, groups, calibration."""
