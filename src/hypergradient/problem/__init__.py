"""What is solved: ``nn.Module``s as pure functions, and a linear bilevel problem in closed form.

Examples:
    >>> import torch, hypergradient as hg
    >>> sorted(hg.params_of(torch.nn.Linear(2, 1)))
    ['bias', 'weight']
    >>> X = torch.eye(2, dtype=torch.float64)[:1]  # overparameterised: 1 example, 2 features
    >>> prob = hg.problem.LinearBilevel(X, X, torch.ones(1, dtype=torch.float64))
    >>> prob.inner_solution(torch.ones(1, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    tensor([1., 1.], dtype=torch.float64)
"""

from ._functional import as_function as as_function
from ._functional import params_of as params_of
from .linear_bilevel import BilevelRun as BilevelRun
from .linear_bilevel import LinearBilevel as LinearBilevel
from .linear_bilevel import run_bilevel as run_bilevel

__all__ = ["BilevelRun", "LinearBilevel", "as_function", "params_of", "run_bilevel"]
