"""What the math raises when it cannot answer, in its own terms.

The attacks are pure functions over tensors: they know nothing of files, options or
exit codes, so they raise these two types and name what failed in the paper's symbols
("the sample deltas have rank 1", "the bias gradient is zero"). The adapters that call
them (``gitool.methods.Method``, the step functions) translate them into gitool's
one-line errors: :class:`AttackError` into a failure (exit 1), :class:`InputError` into a
usage error (exit 2).
"""

from __future__ import annotations


class AttackError(Exception):
    """The inputs are well-formed but do not determine the answer (rank deficiency,
    a zero gradient, a label no prior fits, a diverged optimisation)."""


class InputError(AttackError):
    """The inputs do not fit the math: shapes that disagree, an unknown variant name,
    a value outside its domain."""
