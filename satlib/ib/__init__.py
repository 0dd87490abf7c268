"""Information-bottleneck quantities behind the clustering effect (Chapter 3).

The closed forms and estimators that Chapter 3 uses to check the paper's Section 3.3
(Definition 2, Eq. 3-4, Propositions 1-2, Theorem 1) and the corrected versions of its
arguments, one topic per module:

* ``gaussian``: the Gaussian differential entropy and its three upper bounds (Proposition 2 as
  printed, the tighter bound its proof gives, the Hadamard bound in between), and the overlap
  integral of two Gaussian densities;
* ``mixture``: the Renyi-2 entropy of a Gaussian mixture, its Monte Carlo Shannon entropy, and the
  sound upper bound on the IB loss built from them;
* ``discrete``: the IB loss of a discrete, deterministic representation, in the paper's form and
  in the decomposed form that makes its three cases one-liners;
* ``estimators``: plug-in (binning) and noise-added (pairwise-distance / KDE) estimators of
  entropies and mutual information of network features;
* ``spread``: the per-class spread of features and the bounds on H(T|Y) each form controls;
* ``theorem1``: problems (5) and (6) of Theorem 1 under constraints, solved by projected
  gradient descent;
* ``inputs``: the input checks they share.

All entropies are in nats. Every name below is importable from ``satlib.ib`` directly.
"""

from __future__ import annotations

from .discrete import DiscreteEntropies, discrete_entropies, ib_loss, ib_loss_decomposed
from .estimators import (BinnedEntropies, KDEInformation, binned_entropies, kde_conditional_entropy_lower,
                         kde_conditional_entropy_upper, kde_entropy_lower, kde_entropy_upper, kde_mutual_information)
from .gaussian import (gaussian_entropy, gaussian_overlap, gaussian_self_overlap, hadamard_entropy_bound,
                       log_gaussian_overlap, paper_entropy_bound, tight_entropy_bound)
from .mixture import (IBMixtureBound, MonteCarloEstimate, gaussian_mixture_entropy_mc, ib_loss_upper_bound_mixture,
                      renyi2_entropy_mixture)
from .spread import ClassSpread, class_spread
from .theorem1 import (ConstrainedSolution, configuration_summary, objective_distance, objective_overlap,
                       solve_constrained)

__all__ = [
    # Gaussian entropy and bounds (Proposition 2)
    "gaussian_entropy",
    "paper_entropy_bound",
    "tight_entropy_bound",
    "hadamard_entropy_bound",
    # overlaps and Renyi-2 entropy (Theorem 1)
    "log_gaussian_overlap",
    "gaussian_overlap",
    "gaussian_self_overlap",
    "renyi2_entropy_mixture",
    "MonteCarloEstimate",
    "gaussian_mixture_entropy_mc",
    "IBMixtureBound",
    "ib_loss_upper_bound_mixture",
    # discrete IB loss (Eq. 3-4)
    "DiscreteEntropies",
    "discrete_entropies",
    "ib_loss",
    "ib_loss_decomposed",
    # estimators for network features
    "BinnedEntropies",
    "binned_entropies",
    "KDEInformation",
    "kde_entropy_upper",
    "kde_entropy_lower",
    "kde_conditional_entropy_upper",
    "kde_conditional_entropy_lower",
    "kde_mutual_information",
    # the spread term of L_Cluster and the entropy bounds it controls
    "ClassSpread",
    "class_spread",
    # constrained Theorem 1 experiment
    "objective_distance",
    "objective_overlap",
    "ConstrainedSolution",
    "solve_constrained",
    "configuration_summary",
]
