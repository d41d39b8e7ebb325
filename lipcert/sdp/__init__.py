"""Semidefinite programs for Lipschitz bounds: the LipSDP matrix inequality of a network
(``problem``: assembly, multipliers, the float64 proof that turns a solver's multipliers into a
proven bound) and lipcert's own structured interior-point solver (``fast``). The estimator that
uses them is ``lipcert.estimators.sdp``; nothing here is reported without ``problem.verify``."""
