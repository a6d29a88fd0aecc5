"""Ours with exact packing (`--packing True`): whole samples packed into rows, each sample with its own positions.

Rows hold at most --pack_length tokens, which run.py sets just above the longest sample of a stage's data: 512 for
prepare.py's mixed set (490 tokens, its 64 image tokens included), 1024 for the LLaVA-NeXT next_mixed set (713). A
step takes --batch_size / ROWS_PER_BATCH_DIVISOR rows: for --batch_size 16, 4 rows of 512 token slots, about the
~2,400 tokens of 16 unpacked mixed samples (152 on average), or 4 of 1024, about the ~4,100 of 16 next_mixed
samples (256), so a packed step holds about as many tokens as an unpacked step of ours. A row's samples are counted
as samples (`harness.packed_samples`).

    python bench/speed/side_ours_packed.py --stage stage2 --model DIR --data JSON --image_folder DIR [train flags...]
"""

from __future__ import annotations

import harness
import side_ours

ROWS_PER_BATCH_DIVISOR = 4


def main() -> None:
    args, _ = harness.parse(__doc__)
    rows = max(1, args.batch_size // ROWS_PER_BATCH_DIVISOR)
    # Later flags win in train_llava.py's parser: these replace side_ours' batch size and length.
    side_ours.main("ours_packed", __doc__, ("--packing", "True", "--model_max_length", str(args.pack_length),
                                            "--per_device_train_batch_size", str(rows)))


if __name__ == "__main__":
    main()
