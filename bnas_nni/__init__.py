"""bnas-nni: BNAS (Kim, Singh, Choi; ECCV 2020) binary cell search as an NNI 3.0 plugin.

Importing the package is cheap; NNI is only imported by :mod:`bnas_nni.space` and
:mod:`bnas_nni.search`.
"""
__version__ = '0.1.0'
