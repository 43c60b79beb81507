"""Converters of pretrained weights between mmjax and other frameworks.

  hf_clip       Hugging Face CLIPModel   <-> `mmjax.models.clip.CLIP` (default layout)
  hf_siglip     Hugging Face SiglipModel <-> `CLIP` in the SigLIP layout
  hf_directory  `load_hf_directory`: a local `save_pretrained` directory of either
  hf_common     what the two HF families share (tower configs, tower tensors, layouts)
  weight_map    rules tying torch tensors to our params, applied both ways with checks
"""
