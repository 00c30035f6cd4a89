"""GenEval-mini: accuracy on degraded renders of prompts (must pass) and of scenes violating them
(must fail), per category; detection details; GenEval's relation rule and aggregation."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from flaxflux import geneval_mini as gm
from flaxflux import scenes
from flaxflux.scenes import ObjectSpec, PromptSpec, Scene, SceneObject

MIN_ACCURACY = 0.99


@pytest.fixture(scope="module")
def outcomes():
    """For 100 prompts per category: does the checker pass a degraded render of a scene the
    prompt describes, and fail a degraded render of a scene that violates it?"""
    pos, neg = collections.defaultdict(list), collections.defaultdict(list)
    failures = []
    for i, spec in enumerate(scenes.evaluation_prompts(n_per_category=100, seed=1)):
        rng = np.random.default_rng([11, i])
        r = gm.check(scenes.degrade(scenes.render(spec, rng), rng), spec)
        pos[spec.category].append(r.passed)
        if not r.passed:
            failures.append(f"positive {spec.text!r}: {r.reason}")
        scene, kind = scenes.counterfactual_scene(spec, rng)
        r = gm.check(scenes.degrade(scenes.render(scene), rng), spec)
        neg[spec.category].append(not r.passed)
        if r.passed:
            failures.append(f"negative ({kind}) {spec.text!r} passed: {scene}")
    print("\nGenEval-mini accuracy on degraded renders (positives pass / negatives fail):")
    for c in scenes.CATEGORIES:
        print(f"  {c:14s} {np.mean(pos[c]):.3f} / {np.mean(neg[c]):.3f}  (n={len(pos[c])})")
    print("\n".join(failures))
    return pos, neg


@pytest.mark.parametrize("category", scenes.CATEGORIES)
def test_prompted_scenes_pass(outcomes, category):
    assert np.mean(outcomes[0][category]) >= MIN_ACCURACY


@pytest.mark.parametrize("category", scenes.CATEGORIES)
def test_violating_scenes_fail(outcomes, category):
    assert np.mean(outcomes[1][category]) >= MIN_ACCURACY


def test_training_prompts_pass_on_clean_renders():
    """Training captions (colors named in every category) describe their images."""
    rng = np.random.default_rng(5)
    for _ in range(150):
        spec = scenes.sample_prompt(rng)
        r = gm.check(scenes.render(spec, rng), spec)
        assert r.passed and r.reason == "ok", (spec.text, r.reason)


def _scene(*objs: tuple[str, str, float, float, float]) -> np.ndarray:
    return scenes.render(Scene(tuple(SceneObject(*o) for o in objs)))


def test_detects_each_shape_and_color():
    for shape in scenes.SHAPES:
        for color in scenes.COLORS:
            (d,) = gm.detect(_scene((shape, color, 0.4, 0.6, 0.15)))
            assert (d.shape, d.color) == (shape, color)
            assert d.centroid[0] == pytest.approx(0.4 * 128, abs=0.5)


def test_float_input_matches_uint8():
    rng = np.random.default_rng(6)
    spec = scenes.evaluation_prompts()[200]
    img = scenes.render(spec, rng)
    a, b = gm.detect(img.astype(np.float32) / 255), gm.detect(img)
    assert len(a) == len(b) > 0
    for da, db in zip(a, b):  # float32 rounding may move the template IoU in its last digits only
        assert da == dataclasses.replace(db, shape_iou=da.shape_iou) and da.shape_iou == pytest.approx(db.shape_iou)
    with pytest.raises(ValueError):
        gm.detect(img[..., 0])


def test_noise_and_neutral_marks_are_not_objects():
    rng = np.random.default_rng(7)
    img = np.full((128, 128, 3), 255.0) + rng.normal(0, 8, (128, 128, 3))
    img[40:70, 40:70] = 90    # a grey square
    img[90:93, 20:23] = scenes.PALETTE["red"]  # a 9-pixel speck
    assert gm.detect(np.clip(img, 0, 255).astype(np.uint8)) == []


def test_touching_objects_of_two_colors_are_split():
    img = _scene(("square", "red", 0.4, 0.5, 0.2), ("square", "blue", 0.6, 0.5, 0.2))  # share an edge
    dets = sorted(gm.detect(img), key=lambda d: d.centroid[0])
    assert [(d.shape, d.color) for d in dets] == [("square", "red"), ("square", "blue")]


def test_off_palette_color_counts_for_shape_only_prompts():
    img = _scene(("circle", "blue", 0.5, 0.5, 0.3))
    img[np.all(img == scenes.PALETTE["blue"], -1)] = (0, 180, 180)  # cyan: between green and blue
    (d,) = gm.detect(img)
    assert (d.shape, d.color) == ("circle", None)
    assert gm.check(img, PromptSpec("single_object", (ObjectSpec("circle"),))).passed
    for color in ("green", "blue"):
        assert not gm.check(img, PromptSpec("colors", (ObjectSpec("circle", color),))).passed


def test_rules():
    img = _scene(("circle", "red", 0.2, 0.3, 0.2), ("square", "blue", 0.75, 0.35, 0.2),
                 ("square", "green", 0.5, 0.8, 0.15))
    cases = {
        PromptSpec("single_object", (ObjectSpec("circle"),)): True,          # extra objects are fine
        PromptSpec("single_object", (ObjectSpec("triangle"),)): False,
        PromptSpec("two_object", (ObjectSpec("circle"), ObjectSpec("square"))): True,
        PromptSpec("counting", (ObjectSpec("square", None, 2),)): True,
        PromptSpec("counting", (ObjectSpec("square", None, 3),)): False,     # exactly N
        PromptSpec("counting", (ObjectSpec("square", "blue", 2),)): False,   # N of that color
        PromptSpec("colors", (ObjectSpec("square", "green"),)): True,        # any matching object
        PromptSpec("colors", (ObjectSpec("circle", "blue"),)): False,
        PromptSpec("position", (ObjectSpec("circle"), ObjectSpec("square")), "left of"): True,
        PromptSpec("position", (ObjectSpec("circle"), ObjectSpec("square")), "above"): True,  # vs green
        PromptSpec("position", (ObjectSpec("circle"), ObjectSpec("square")), "right of"): False,
        PromptSpec("position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "above"): False,
        PromptSpec("color_attr", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))): True,
        PromptSpec("color_attr", (ObjectSpec("circle", "blue"), ObjectSpec("square", "red"))): False,
    }
    for spec, expected in cases.items():
        r = gm.check(img, spec)
        assert r.passed == expected, (spec.text, r.reason)
        assert (r.reason == "ok") == expected and r.prompt == spec.text and len(r.detections) == 3


def _det(x: float, y: float, w: int = 10, h: int = 10) -> gm.Detection:
    return gm.Detection("circle", "red", (x, y), (int(x - w / 2), int(y - h / 2), int(x + w / 2), int(y + h / 2)), 80, 1.0)


def test_relations_follow_geneval():
    b = _det(50, 50)
    assert gm.relations(_det(20, 50), b) == {"left of"}
    assert gm.relations(_det(80, 52), b) == {"right of"}
    assert gm.relations(_det(50, 10), b) == {"above"}
    assert gm.relations(_det(50, 90), b) == {"below"}
    assert gm.relations(_det(80, 80), b) == {"right of", "below"}      # diagonal: both
    assert gm.relations(_det(53, 49), b) == set()                      # within 0.1 x summed size
    assert gm.relations(_det(80, 68), b) == {"right of"}               # mostly right


def test_score_is_mean_of_category_means():
    def r(cat: str, ok: bool) -> gm.CheckResult:
        return gm.CheckResult(ok, cat, "", "", ())
    results = [r("counting", True)] * 3 + [r("counting", False)] + [r("position", False)] * 2
    s = gm.score(results)
    assert s == {"counting": 0.75, "position": 0.0, "overall": 0.375}  # not the image mean 0.5
