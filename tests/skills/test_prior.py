"""The occupation prior: the skills of the occupations a text is closest to, as shares of those occupations."""

from __future__ import annotations

import numpy as np
import pytest

from openemploi.skills.prior import OccupationPrior
from openemploi.skills.profiles import ProfileSkill


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, np.float32)
    return v / np.linalg.norm(v)


def prior() -> OccupationPrior:
    """Three occupations on three axes; skill 0 in the first two profiles, 1 in the first, 2 in the third."""
    profiles = {
        "N1101": [ProfileSkill(0, 0.6, "conduire un chariot"), ProfileSkill(1, 0.5, "charger un camion")],
        "N1103": [ProfileSkill(0, 0.5, "conduire un chariot")],
        "G1602": [ProfileSkill(2, 0.7, "cuisiner")],
    }
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    return OccupationPrior.build(["N1101", "N1103", "G1602"], profiles, vectors, skills=4)


def test_a_skill_weighs_the_share_of_the_nearest_occupations_that_hold_it():
    text = unit(1, 0.8, 0.1)  # nearest N1101, then N1103, far from G1602
    assert prior().shares(text, nearest=1) == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert prior().shares(text, nearest=2) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert prior().shares(text, nearest=3) == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0.0])


def test_nothing_to_go_by_gives_no_prior():
    assert not prior().shares(unit(1, 0, 0), nearest=0).any()
    empty = OccupationPrior.build([], {}, np.zeros((0, 3), np.float32), skills=4)
    assert not empty.shares(unit(1, 0, 0), nearest=5).any()
    unprofiled = OccupationPrior.build(["K2111"], {}, unit(1, 0, 0)[None, :], skills=4)
    assert not unprofiled.shares(unit(1, 0, 0), nearest=5).any()
