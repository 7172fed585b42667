"""NNI integration: trial-side reporting (:mod:`.trial`) and running the NNI manager safely (:mod:`.manager`).

The package is named after what it wraps; inside it, ``import nni`` still means Microsoft NNI.
"""
