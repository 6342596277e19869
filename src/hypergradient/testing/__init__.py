"""Problems with exact hypergradients, and finite differences, for checking any method.

Examples:
    >>> import hypergradient as hg
    >>> p = hg.testing.ridge_problem(n_train=20, n_val=10, dim=3)  # exact hypergrad known
    >>> g = hg.implicit_hypergrad(p.inner_loss, p.outer_loss, p.params, p.hparams, "cg")
    >>> hg.testing.relative_error(g, p.hypergrad) < 1e-8
    True
"""

from .problems import BilevelTestProblem as BilevelTestProblem
from .problems import finite_difference_hypergrad as finite_difference_hypergrad
from .problems import logistic_problem as logistic_problem
from .problems import quadratic_problem as quadratic_problem
from .problems import relative_error as relative_error
from .problems import ridge_problem as ridge_problem

__all__ = [
    "BilevelTestProblem",
    "finite_difference_hypergrad",
    "logistic_problem",
    "quadratic_problem",
    "relative_error",
    "ridge_problem",
]
