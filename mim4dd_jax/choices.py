"""The names of valid choices for config fields whose modules import ``config``.

``config.validate`` checks these names; the modules that use them import them from here. This
module imports nothing of ours, so ``config`` never has to import a module that imports it back.
"""

# distill.optimizer, mi.optimizer: optax optimisers by name (state.make_optimizer).
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "lamb")
# distill.init: real images per class, or standard normal pixels in model space.
INITS = ("real", "noise")
# mtt.remat: rematerialise each student step ("auto" = on except on GPU/TPU).
REMAT = ("auto", "on", "off")
# mi.networks (MTT): real features from the expert ("paired") or from the student ("shared").
MI_NETWORKS = ("paired", "shared")
# mi.feature_nets (DM, DC/DSA): the MI term's features from the base method's own (random or
# in-training) network, or from an expert checkpoint drawn each step (a trained feature space).
MI_FEATURE_NETS = ("random", "experts")
# mi.objective: the add-on term. "mim4dd": the contrastive MI between real and synthetic features
# (maximised); "cmidd": CMIDD's class-conditional MI of the synthetic features alone (minimised),
# the studies' positive control (mi/conditional.py).
MI_OBJECTIVES = ("mim4dd", "cmidd")
# mi.weight_mode: lambda = mi.weight, or mi.weight * |g_base| / |g_mi| (steps_core).
MI_WEIGHT_MODES = ("absolute", "relative")
# coreset.features: the space herding / k-center select in.
FEATURE_SPACES = ("pixels", "random_net", "trained_net")
