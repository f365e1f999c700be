"""Dense Connector swaps for code derived from original research repositories (core only).

* :mod:`~mmconnect.integrations.codebases.llava` — models of the original LLaVA codebase and its
  forks (``encode_images`` = vision tower, then ``mm_projector``);
* :mod:`~mmconnect.integrations.codebases.mini_gemini` — models of the original Mini-Gemini (MGM)
  codebase (``encode_images(images, images_aux)`` with patch info mining).

These modules need only the core dependencies (torch, einops, safetensors): the codebases they
plug into bring their own.
"""
