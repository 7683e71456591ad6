"""The neutral layer below ``lce.posenc`` and ``lce.attention``: what a patched layer's attention is (``plan``), the
protocol methods patch a model through (``target``), and the engines they compute with (``segments`` and
``staircase`` for position-remapping methods, ``blockwise`` for sparse patterns). It imports neither of them nor
transformers; ``lce.hf`` implements the protocol and runs the plans."""
