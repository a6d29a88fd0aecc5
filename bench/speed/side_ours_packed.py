"""Ours with exact packing (`--packing True`): whole samples packed into rows, each sample with its own positions.

Rows hold at most PACK_LENGTH tokens, just above the longest sample of prepare.py's mixed set (490 tokens, the
64 image tokens included), and a step takes --batch_size / ROWS_PER_BATCH_DIVISOR rows: 4 rows of 512 token slots
for --batch_size 16, about the ~2,400 tokens of 16 unpacked mixed samples (152 on average), so a packed step holds
about as many tokens as an unpacked step of ours. A row's samples are counted as samples (`harness.packed_samples`).

    python bench/speed/side_ours_packed.py --stage stage2 --model DIR --data JSON --image_folder DIR [train flags...]
"""

from __future__ import annotations

import harness
import side_ours

PACK_LENGTH = 512
ROWS_PER_BATCH_DIVISOR = 4


def main() -> None:
    args, _ = harness.parse(__doc__)
    rows = max(1, args.batch_size // ROWS_PER_BATCH_DIVISOR)
    # Later flags win in train_llava.py's parser: these replace side_ours' batch size and length.
    side_ours.main("ours_packed", __doc__, ("--packing", "True", "--model_max_length", str(PACK_LENGTH),
                                            "--per_device_train_batch_size", str(rows)))


if __name__ == "__main__":
    main()
