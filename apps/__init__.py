"""Applications built on the library packages: the analysis CLI (``python -m i2am
analyze``) with its HTML report, and the stability experiment runner."""
