"""General metrics, each against a count written out by hand."""
import numpy as np
import pytest

from diffnb.metrics import hungarian_miou, overlap_miou


def test_overlap_miou_joins_each_segment_to_the_region_it_overlaps_most():
    """Regions: left and right halves of a 4 x 4 image. Four segments: 0 and 2 lie in the left half, 1 in the right,
    3 has four right pixels and one left. Joined: left = segments 0 + 2 (7 of the 8 left pixels), right = 1 + 3
    (all 8 right pixels and 1 left one): IoU 7/8 and 8/9. Hungarian matching keeps one segment per region."""
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :, :2], gt[1, :, 2:] = True, True
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 3, 3, 3]])
    assert overlap_miou(labels, gt) == pytest.approx((7 / 8 + 8 / 9) / 2)
    assert hungarian_miou(labels, gt) < overlap_miou(labels, gt)
    assert overlap_miou(gt[1].astype(int), gt) == 1.0  # a perfect two-segment answer
    with pytest.raises(ValueError, match="differ in size"):
        overlap_miou(labels[:2], gt)
