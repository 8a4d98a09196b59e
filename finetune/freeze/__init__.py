"""The freeze policy: what stays fixed, at which rates the rest train, BatchNorm and release epochs; :mod:`.rule`
decides, :mod:`.plan` plans for one model, :mod:`.hold` acts on it."""
from .hold import adapt_bn, apply, hold_eval, set_trainable, trainable
from .plan import GroupPlan, Plan, auto, fixed, from_decision, full, make_plan, n_body_groups, plan_for, probe
from .rule import (ADAPT_FROM, BN_MODES, DOMAINS, RETRAIN_BN_BATCH, RETRAIN_BN_FROM, RETRAIN_BN_PER_CLASS, SCHEDULES,
                   Decision, bn_policy, data_score, decide, explain, releases, trainable_share)

__all__ = ["Plan", "GroupPlan", "Decision", "auto", "fixed", "probe", "full", "make_plan", "from_decision",
           "plan_for", "n_body_groups", "decide", "explain", "releases", "data_score", "trainable_share",
           "bn_policy", "apply", "hold_eval", "set_trainable", "trainable", "adapt_bn", "DOMAINS", "BN_MODES",
           "SCHEDULES", "ADAPT_FROM", "RETRAIN_BN_FROM", "RETRAIN_BN_PER_CLASS", "RETRAIN_BN_BATCH"]
