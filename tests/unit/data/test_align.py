"""The aligner's chip geometry."""

import numpy as np


def test_the_chip_geometry_is_the_landmark_transform(lfw_root):
    """``align_with_geometry``'s chip -> image map equals the 5-point transform the
    anonymizers use (one geometry), and the chip is ``align``'s chip."""
    import dlib

    from fedface.anonymize.geometry import chip_transform
    from fedface.data.align import AlignConfig, FaceAligner
    from fedface.data.images import load_image

    aligner = FaceAligner(AlignConfig(size=112))
    image = load_image(next((lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol").glob("*.jpg")))
    chip, affine, status = aligner.align_with_geometry(image)
    assert status == "detected" and np.array_equal(chip, aligner.align(image)[0])
    box = aligner._detect(image)[0]
    shape = aligner.predictor(image, dlib.rectangle(*(round(v) for v in box[:2]),
                                                    round(box[2]) - 1, round(box[3]) - 1))
    landmarks = np.array([[p.x, p.y] for p in shape.parts()], float)
    assert np.allclose(affine, chip_transform(landmarks, 112, 0.25), atol=1e-6)
