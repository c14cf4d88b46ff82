"""Rehearsal of the paper profiles without weights: the real model classes and processors at the
released checkpoints' configurations, random-initialised and reduced only in width and depth, on
fixture data sets written in each real data set's layout, with the LLaVA-Bench judge served by a
stub on loopback.

A leaf like ``saev.shapesworld``: only a profile with a ``rehearsal:`` section loads it
(``params/paper-llava-rehearsal.yaml``, ``params/paper-chameleon-rehearsal.yaml``), and nothing in the
core or the experiments imports it. ``python -m saev.rehearsal build --profile NAME`` writes the models
and data sets the profile's ``model_dir`` and ``data:`` paths point at (``run_all.sh`` does it before
its input check); ``python -m saev.rehearsal judge --profile NAME`` serves the judge stub.

* :mod:`saev.rehearsal.models`: the released configurations (``RELEASED``) and the builders;
* :mod:`saev.rehearsal.data`: the fixture data sets in the layouts ``saev.paper.data`` reads;
* :mod:`saev.rehearsal.judge`: the stub judge (an OpenAI-compatible ``/chat/completions``);
* :mod:`saev.rehearsal.config`: the ``rehearsal:`` section and :func:`build_rehearsal`.
"""

from saev.rehearsal.config import RehearsalConfig, build_rehearsal

__all__ = ["RehearsalConfig", "build_rehearsal"]
