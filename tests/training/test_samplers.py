"""`SeededLengthGroupedSampler`: the order is a function of the seed and the epoch, whatever the global RNG holds."""

import torch

from llava.training.samplers import SeededLengthGroupedSampler

LENGTHS = [5, 40, 12, 33, 7, 21, 18, 9, 27, 14, 30, 11]


def order(seed, epoch):
    sampler = SeededLengthGroupedSampler(2, LENGTHS, seed)
    sampler.set_epoch(epoch)
    torch.manual_seed(epoch * 1000 + 7)  # the global RNG as other work left it: must not matter
    return list(sampler)


def test_order_depends_on_seed_and_epoch_only():
    assert order(0, 1) == order(0, 1)
    assert sorted(order(0, 1)) == list(range(len(LENGTHS)))
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    batches = [order(0, 3)[i:i + 2] for i in range(0, len(LENGTHS), 2)]
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)  # upstream's rule: the longest batch first
