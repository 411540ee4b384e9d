"""Problems 2-6 of homework 6, each as a closed form checked numerically against PyTorch.

One small pure module per problem: `init_stats` (Problem 2), `conv_grad` (Problem 3),
`density` (Problem 4) and `kl` (Problems 5 and 6).  They compute in float64, return
dataclasses, raise bnstrip.errors.InputError on bad input and never print; the
`bnstrip init-stats/conv-grad/density/kl` commands in bnstrip.cli.maths print them.
Importing this package does not import torch; the modules do.
"""
from __future__ import annotations
