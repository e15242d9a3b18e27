"""E2GAN (ICML 2024): real-time image-editing GANs distilled from a diffusion editor.

One file per job:

- ``teachers.py``  the teacher editors: diffusers InstructPix2Pix / img2img by path, or honest
  offline stand-ins (deterministic OpenCV edits, named as such in every record);
- ``pairs.py``     ``hyperhuman distill edit-pairs``: shard photos → (input, edited) pair shards per
  concept (side by side in one HumanVerse sample, the teacher recorded);
- ``data.py``      pair shards → aligned training crops, resumable batches, held-out pairs;
- ``generator.py`` the text-conditioned generator (down → ResNet ×2 → transformer → ResNet → up),
  ``load_generator``;
- ``discriminator.py`` the PatchGAN;
- ``train.py``     ``hyperhuman distill gan``: the base GAN on several concepts' pairs.
"""
