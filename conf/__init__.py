"""Hydra configuration shipped with lce (``pkg://lce.conf``)."""
