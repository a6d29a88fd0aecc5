import torch

from llava.data.collator import LlavaDataCollator

PAD = 777  # sentinel, distinct from every id and from the -100 label sentinel


def item(ids, labels, images=0):
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if images:
        out["pixel_values"] = torch.full((images, 3, 4, 4), float(ids[0]))
    return out


def test_right_padding_masks_and_pixel_order():
    items = [item([1, 2, 3], [-100, 2, 3], images=1), item([4, 5], [-100, 5]), item([6, 7, 8, 9], [-100] * 3 + [9], 2)]
    batch = LlavaDataCollator(pad_token_id=PAD)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD], [4, 5, PAD, PAD], [6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100], [-100, -100, -100, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    # images of sample 0, then sample 2's two: the order their image tokens appear in the flattened batch
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 6.0, 6.0]


def test_text_only_batch_has_no_pixels_and_pads_to_multiple():
    batch = LlavaDataCollator(pad_token_id=PAD, pad_to_multiple_of=8)([item([1, 2, 3], [1, 2, 3])])
    assert "pixel_values" not in batch
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 3:].eq(-100).all()
