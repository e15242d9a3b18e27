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
- ``train.py``     ``hyperhuman distill gan``: the base GAN on several concepts' pairs;
- ``lora.py``      LoRA adapters (peft) on the generator's named layers: layer groups, one adapter file
  per concept, ``load_concept`` / ``use_concept`` (swap) / ``merge_concept`` (export);
- ``importance.py`` the layer-importance search (crucial groups) and the rank search;
- ``subset.py``    minimal data: k-means over pair embeddings, one pair per cluster;
- ``concept.py``   ``hyperhuman distill gan-concept``: a new concept as a LoRA adapter on the base;
- ``search.py``    the generator's widths: PaS masks, their exact removal, the latency cost of chained
  widths (:class:`distill.width_cost.WidthCost` with couplings), the search;
- ``search_train.py`` ``hyperhuman distill gan-search``: search to a latency target, removal, KD fine-tune;
- ``deploy.py``    one concept baked into an editor of the image alone: torch, compiled, PT2E int8,
  ONNX Runtime fp32 / QDQ int8;
- ``edit.py``      ``hyperhuman edit``: a concept applied to a folder of images or a video, frames/s.
"""
