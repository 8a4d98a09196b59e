"""The freeze policy: which stages stay fixed, at which learning rates the rest train, how BatchNorm behaves and
when fixed stages are released. One idea a module: :mod:`.rule` (the automatic decision and its explanation),
:mod:`.plan` (a plan for one model, from a decision, by hand, or for a recipe), :mod:`.hold` (acting on a model).
Every stage is an optimizer param group from the first step (:mod:`finetune.optim`): releasing one only flips
``requires_grad`` and its learning-rate factor, so schedulers, checkpoints and DDP see one fixed optimizer.
"""
from .hold import adapt_bn, apply, hold_eval, set_trainable, trainable
from .plan import GroupPlan, Plan, auto, fixed, from_decision, full, make_plan, n_body_groups, plan_for, probe
from .rule import (ADAPT_FROM, BN_MODES, DOMAINS, RETRAIN_BN_BATCH, RETRAIN_BN_FROM, RETRAIN_BN_PER_CLASS, SCHEDULES,
                   Decision, bn_policy, data_score, decide, explain, releases, trainable_share)

__all__ = ["Plan", "GroupPlan", "Decision", "auto", "fixed", "probe", "full", "make_plan", "from_decision",
           "plan_for", "n_body_groups", "decide", "explain", "releases", "data_score", "trainable_share",
           "bn_policy", "apply", "hold_eval", "set_trainable", "trainable", "adapt_bn", "DOMAINS", "BN_MODES",
           "SCHEDULES", "ADAPT_FROM", "RETRAIN_BN_FROM", "RETRAIN_BN_PER_CLASS", "RETRAIN_BN_BATCH"]
