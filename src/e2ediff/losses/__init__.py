"""Losses for end-to-end training: the paper's reconstruction distances (L1, L2, LPIPS, hybrid, GAN) and the
distributional losses (energy score / energy distance, minibatch OT coupling). Each returns one value per sample."""
from e2ediff.losses.coupling import minibatch_ot_pairing
from e2ediff.losses.energy import energy_distance_by_group, energy_score
from e2ediff.losses.gan import (LatentDiscriminator, PixelDiscriminator, ProjectionDiscriminator,
                                adaptive_gan_weight, d_hinge, d_nonsaturating, g_hinge, g_nonsaturating, r1_penalty)
from e2ediff.losses.perceptual import (LPIPS, AlexNetFeatures, FashionFeatureNet, ImageNetScaling, VGG16Features,
                                       augment, load_tensor_file, nt_xent, train_feature_net)
from e2ediff.losses.recon import HybridWeights, hybrid, l1, l2

__all__ = [
    "l1", "l2", "HybridWeights", "hybrid",
    "energy_score", "energy_distance_by_group",
    "LPIPS", "VGG16Features", "AlexNetFeatures", "FashionFeatureNet", "ImageNetScaling", "train_feature_net",
    "augment", "nt_xent", "load_tensor_file",
    "ProjectionDiscriminator", "LatentDiscriminator", "PixelDiscriminator",
    "d_hinge", "g_hinge", "d_nonsaturating", "g_nonsaturating", "r1_penalty", "adaptive_gan_weight",
    "minibatch_ot_pairing",
]
