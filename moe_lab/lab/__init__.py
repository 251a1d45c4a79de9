"""The book's experiment harness, not the library.

``moe_lab`` proper is a small MoE library (config, experts, routing, dispatch, losses, layer,
model, data, train, parallel, kernels, scaling): code a reader can put in their own model.
This subpackage holds what only the chapters need, kept apart so the library reads short:

- ``toy``: the piecewise-linear regression of chapter 2, small enough to plot.
- ``balance``: chapter 6's balancing experiment (no balancing, Switch aux loss, bias balancing).
- ``presets``: the tiny language model's training presets and variants behind chapter 7's
  committed runs (``python -m moe_lab.train --config P --variant V``), kept for the record.
- ``results``: loaders and fair (seed-paired) comparisons of those committed training logs.
- ``viz``: the chapters' figure and table helpers (every figure titled and labelled).

Nothing in the library imports from here except the training command line, which offers the
presets by name. Import the modules directly (``from moe_lab.lab.toy import region``); this
file imports nothing, so loading one harness never loads the others.
"""
