"""The robustness bound of Theorem 2 (the paper's Eq. 11, corrected in Chapter 6 as thm-ch6-bound).

Write the network as ``z = W h(x) + b``: ``h`` is the *feature map* (everything up to the input of the
last linear layer, ``model.linear`` for both models of the book) and ``z`` the logits. For the label
``y`` predicted at ``x``, Hoelder's inequality (``1/u + 1/v = 1``) gives, for every perturbation ``r``
and class ``j != y``,

    z_y(x+r) - z_j(x+r) >= z_y(x) - z_j(x) - ||W_y - W_j||_u ||h(x+r) - h(x)||_v,

so the label cannot change while the feature shift stays below the *feature margin*

    rho(x) = min_{j != y} (z_y(x) - z_j(x)) / ||W_y - W_j||_u          (``feature_margin``).

One topic per module:

* ``norms``: the p-norms with their duals and conversions, and the operator norms of convolutions;
* ``margin``: h and the logits from one forward pass, and the feature margin rho(x);
* ``lipschitz``: ``lipschitz_bound``, an upper bound on Lip(h) from the L-inf input norm (the threat
  model) to the v-norm of the features, composed from per-layer rules registered per module type
  (``lipschitz_rule``);
* ``radii``: the certified radius ``min(eps, rho(x) / Lip(h))`` and the attack-based upper estimates
  (``empirical_radius``, ``flip_radius``), bisected per sample with the library's sign-gradient loop;
* ``tables``: the per-sample tables of Chapter 6 (``certify``, ``estimate_radii``, ``shift_and_spread``).

Every name below is importable from ``satlib.bound`` directly.
"""
from __future__ import annotations

from .lipschitz import DENSE_LIMIT, LIPSCHITZ_RULES, LayerTable, LipschitzBound, lipschitz_bound, lipschitz_rule
from .margin import FEATURES, feature_margin, features_and_logits, last_linear
from .norms import (INF, NORMS, conv_matrix, conv_norm_dense, conv_norm_fft, conv_norm_power, dual_norm,
                    first_layer_inf_to_2, norm_conversion, norm_value)
from .radii import (FeatureShift, bisect_radius, certified_radius, empirical_radius, feature_shift_attack,
                    flip_radius, margin_attack)
from .tables import certify, estimate_radii, shift_and_spread

__all__ = ["DENSE_LIMIT", "FEATURES", "FeatureShift", "INF", "LIPSCHITZ_RULES", "LayerTable", "LipschitzBound",
           "NORMS", "bisect_radius", "certified_radius", "certify", "conv_matrix", "conv_norm_dense",
           "conv_norm_fft", "conv_norm_power", "dual_norm", "empirical_radius", "estimate_radii",
           "feature_margin", "feature_shift_attack", "features_and_logits", "first_layer_inf_to_2",
           "flip_radius", "last_linear", "lipschitz_bound", "lipschitz_rule", "margin_attack",
           "norm_conversion", "norm_value", "shift_and_spread"]
