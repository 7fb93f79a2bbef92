"""wam-edge runtime: the on-robot loop for one-step world action models.

Never imports torch; runs on Python 3.8 (numpy 1.x) through 3.12 (numpy 2.x).
"""

__version__ = "0.1.0"
