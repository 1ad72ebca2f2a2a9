"""Face anonymization for images and video, on the command line and as client-side
preprocessing, measured against an independent matcher.

- :mod:`~fedface.anonymize.detect`: dlib HOG/CNN detection (scale, threshold, upsampling,
  minimum size, landmarks); :mod:`~fedface.anonymize.boxes`: the face box type.
- Methods, one module per family: :mod:`~fedface.anonymize.classic` (blur, mosaic, mask),
  :mod:`~fedface.anonymize.dppix` (DP pixelization), :mod:`~fedface.anonymize.ksame`
  (K-Same), :mod:`~fedface.anonymize.cloak` (adversarial cloak against a surrogate model),
  :mod:`~fedface.anonymize.scramble` (key-reversible; its keys in :mod:`crypto.scramble`);
  :mod:`~fedface.anonymize.registry` names them with their presets.
- :mod:`~fedface.anonymize.pipeline`: detection + method + the fail-closed policy;
  :mod:`~fedface.anonymize.files`: files and folder trees (``fedface anonymize``);
  :mod:`~fedface.anonymize.video`: video through PyAV with tracking and the audio kept.
- :mod:`~fedface.anonymize.chips`: a client's aligned training chips (``anonymize=METHOD``).
- :mod:`~fedface.anonymize.evaluate` and :mod:`~fedface.anonymize.bench`: what each method
  really hides (``fedface bench anonymize``).

Nothing is imported here: import the module you need (dlib, PyAV and torch load lazily).
"""
