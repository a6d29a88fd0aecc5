"""Scoring (`llava.model.evaluation`): per-type accuracy, the blind control and its gap, POPE-style yes/no figures,
the most frequent mistakes, and blank images of the processor's mean colour."""

import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from llava.model.evaluation import Prediction, blank_like, card_grid, sample_card, score, yes_no_figures


def prediction(answer_type, reference, answer, blind=None):
    return Prediction(id=f"{answer_type}-{reference}-{answer}", answer_type=answer_type, reference=reference,
                      prediction=answer, correct=answer.lower().strip(".") == reference.lower(), blind=blind,
                      blind_correct=None if blind is None else blind.lower() == reference.lower())


def test_gap_is_sighted_minus_blind_per_type():
    predictions = [prediction("colour", "red", "Red.", blind="blue"), prediction("colour", "blue", "blue", "blue"),
                   prediction("shape", "circle", "square", "circle"), prediction("shape", "square", "square", "x")]
    result = score(predictions)
    assert result["accuracy_by_type"] == {"colour": 1.0, "shape": 0.5}
    assert result["blind_accuracy_by_type"] == {"colour": 0.5, "shape": 0.5}
    assert result["gap_by_type"] == {"colour": 0.5, "shape": 0.0}
    assert result["accuracy"] == 0.75 and result["blind_accuracy"] == 0.5 and result["gap"] == 0.25
    assert result["most_frequent_mistakes"] == [{"reference": "circle", "prediction": "square", "count": 1}]
    assert "yes_no" not in result


def test_yes_no_figures_as_pope_reports_them():
    # 4 yes / 4 no references; the model says yes 5 times: 3 right (TP), 2 wrong (FP); 2 yes missed (FN).
    said = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no"]
    truth = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    figures = yes_no_figures([prediction("yes/no", t, s, blind="yes") for t, s in zip(truth, said)])
    assert figures["num_samples"] == 8 and figures["reference_yes_ratio"] == 0.5
    assert figures["precision"] == 0.6 and figures["recall"] == 0.75 and figures["yes_ratio"] == 0.625
    assert figures["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35, abs=1e-4) and figures["accuracy"] == 0.625
    assert figures["blind"]["yes_ratio"] == 1.0 and figures["blind"]["recall"] == 1.0  # a blind model that says yes


def test_without_a_blind_control_there_are_no_blind_figures():
    result = score([prediction("all", "yes", "yes")])
    assert "blind_accuracy" not in result and "blind" not in result["yes_no"] and result["accuracy_by_type"] == {}


def test_the_blank_image_is_the_processors_mean_colour_at_the_same_size():
    processor = CLIPImageProcessor(image_mean=[0.5, 0.25, 1.0])
    blank = blank_like(Image.new("RGB", (40, 24), (9, 9, 9)), processor)
    assert blank.size == (40, 24) and set(blank.getdata()) == {(128, 64, 255)}


def test_cards_tile_into_one_grid():
    cards = [sample_card(Image.new("RGB", (8, 8)), ["Q: a", "model: b", "truth: c"]) for _ in range(5)]
    grid = card_grid(cards, columns=4)
    assert grid.shape == (2 * cards[0].height, 4 * cards[0].width, 3)
