"""Asking a Dense model about an image or a video (needs the ``hf`` extra; videos: ``video``).

* :mod:`~mmconnect.integrations.chat.answering` — image and training-free video answering
  (FreeVA pooling) for any Dense family model;
* :mod:`~mmconnect.integrations.chat.video_io` — decoding video files (PyAV, imported only when a
  video file is opened) and frame folders.
"""
