"""The anonymizers against their adversaries, on real faces.

Adversary: whoever holds an anonymized image and runs a recognizer fedface did not train
(dlib's 128-d ResNet), told where the face is (the clean image's box). Clean photos of the
same person match; after the high presets of blur, mosaic and mask, and after scrambling
(restored with a wrong key), the same recognizer no longer matches them. The full
measurement (naive and adaptive rates at FAR 0.1%, every preset) is `fedface bench
anonymize`; this test is its small, always-run witness.
"""

import functools

import numpy as np
import pytest

# dlib's distance at FAR 0.1% on LFW pairsDevTest (fedface bench anonymize measures 0.549).
THRESHOLD = 0.55


@pytest.fixture
def genuine_pairs(lfw_root):
    return _pairs(str(lfw_root))


@functools.cache
def _pairs(lfw_root):
    from fedface.anonymize.evaluate import DlibMatcher, lfw_pair_images
    from fedface.data.images import load_image

    paths, pairs = lfw_pair_images(lfw_root, "pairsDevTest.txt")
    idx = np.flatnonzero(pairs.same)[::50][:8]  # 8 genuine pairs spread over the file
    matcher = DlibMatcher()
    out = []
    for i in idx:
        a, b = load_image(paths[pairs.a[i]]), load_image(paths[pairs.b[i]])
        box_a, _ = matcher.locate(a)
        box_b, _ = matcher.locate(b)
        out.append((a, box_a, b, box_b))
    return matcher, out


def _anonymize(name, preset, image, box):
    from fedface.anonymize.registry import build_method

    grown = box.expand(1.25 * 1.3)  # how `fedface anonymize` grows a dlib box by default
    key = bytes(range(32))
    method = build_method(name, preset, key=key)
    if name == "scramble":
        from fedface.anonymize.scramble import restore, scramble
        s, meta = scramble(image, [grown], key)
        return restore(s, meta, bytes(32), check=False)  # the attacker's wrong key
    return method.apply(image, [grown])


def test_clean_faces_match(genuine_pairs):
    matcher, pairs = genuine_pairs
    d = [np.linalg.norm(matcher.describe(a, ba) - matcher.describe(b, bb)) for a, ba, b, bb in pairs]
    assert sum(x < THRESHOLD for x in d) >= 6  # dlib re-identifies ~92% of clean pairs


@pytest.mark.parametrize("name,preset", [("blur", "high"), ("mosaic", "high"), ("mask", "medium"),
                                         ("scramble", "medium")])
def test_anonymized_probe_is_not_matched_to_the_clean_gallery(genuine_pairs, name, preset):
    matcher, pairs = genuine_pairs
    matched = 0
    for a, box_a, b, box_b in pairs:
        gallery = matcher.describe(a, box_a)
        probe = matcher.describe(_anonymize(name, preset, b, box_b), box_b)
        matched += np.linalg.norm(gallery - probe) < THRESHOLD
    assert matched <= 1, f"{name}/{preset}: {matched}/8 anonymized probes re-identified"
