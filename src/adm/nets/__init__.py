"""The ADM networks, pure torch, under the original state-dict keys.

- `nn`: primitives: GroupNorm32, zero_module, the sinusoidal timestep embedding, QKV attention
- `unet`: the ADM UNet (AdaGN, BigGAN up/down blocks, attention) and the super-resolution UNet
- `classifier`: the noisy classifier: the UNet's encoder half with a pooling head
"""
