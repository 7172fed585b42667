"""NNI integration: reporting from inside a trial, and running the NNI manager safely on a shared machine.

* :mod:`.trial`: what a trial reports to NNI (rank 0 only) and whether it runs under NNI;
* :mod:`.loopback`: the Node.js preload that binds the manager to 127.0.0.1, and private network namespaces;
* :mod:`.environment`: ``HOME`` redirected, the preload, gloo on loopback (for nnictl, its trials, or this process);
* :mod:`.nnictl`: ``nnictl create``/``stop`` as functions, and the manifest nnictl keeps;
* :mod:`.rest`: the manager's REST API on 127.0.0.1 (client, polling, a free port);
* :mod:`.forensics`: the one-line reason why nnictl refused, a manager died or a trial failed;
* :mod:`.processes`: whether a PID runs, and stopping one for sure;
* :mod:`.lifecycle`: start an experiment until a trial really runs, stop it until nothing is left;
* :mod:`.cli`: ``bnas-nni nni create|stop|list`` on top.

The package is named after what it wraps; inside it, ``import nni`` still means Microsoft NNI. Only
:mod:`.trial` and :func:`.environment.redirected_nni_home` import NNI, and only when called.
"""
