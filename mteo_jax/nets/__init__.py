"""Backbones (MLP, UNet, DiT, and any Linen model through ``LinenBackbone``) with the time embedding lifted out
(DESIGN §3), the backbone registry and the denoiser wrapper."""

from mteo_jax.nets.backbone import BACKBONES, Backbone, Denoiser, TimeEmb, get_backbone, make_denoiser
from mteo_jax.nets.adapter import LinenBackbone
from mteo_jax.nets.dit import DiT
from mteo_jax.nets.mlp import MLP
from mteo_jax.nets.unet import UNet

__all__ = ["BACKBONES", "Backbone", "Denoiser", "TimeEmb", "get_backbone", "make_denoiser", "DiT", "LinenBackbone", "MLP",
           "UNet"]
