"""Random streams: derived in one place, stable values for images, no two streams alike."""

import torch

from ddimctl import seeds


def test_image_streams_keep_their_values():
    # The first value of image 0 of seed 0: the same images as every earlier version for a seed.
    assert seeds.image_seed(0, 0) == 454509061159886548
    a = seeds.initial_noise(seeds.image_generators(3, [5]), (1, 2, 2))
    b = seeds.initial_noise(seeds.image_generators(3, [4, 5, 6]), (1, 2, 2))[1:2]
    assert torch.equal(a, b)  # image 5 alone or in a batch


def test_named_streams_never_share_values():
    """The old dropout stream was the data stream of seed + 1: run s's dropout was run s + 1's data.
    That each use draws from its own stream is held by test_training_streams_are_not_image_streams
    and by the kill-and-resume bit-identity test (tests/test_train.py)."""
    data_next_run = seeds.image_seed(1, 7 * 65536)
    assert seeds.dropout(0, 7, 0) != data_next_run
    values = {seeds.dropout(s, step, rank) for s in range(3) for step in range(50) for rank in range(4)}
    values |= {seeds.image_seed(s, i) for s in range(3) for i in range(50)}
    assert len(values) == 3 * 50 * 4 + 3 * 50
    assert seeds.derive(0, "dropout", 1, 2) != seeds.derive(0, "dropout", 12)  # keys are separated


def test_training_streams_are_not_image_streams():
    """Every stream a run draws from has a seed of its own: training batches and epoch orders are
    no image's stream (before, training step 1 of rank 0 drew image 65536's values)."""

    def first_value(generator: torch.Generator) -> float:
        return float(torch.rand(1, generator=generator))

    images = {first_value(g) for s in range(2) for g in seeds.image_generators(s, [0, 1, 65536, 65537, 131072])}
    batches = {first_value(seeds.training_batch(s, step, rank)) for s in range(2) for step in range(3) for rank in range(2)}
    epochs = {first_value(seeds.epoch_order(s, e)) for s in range(2) for e in range(3)}
    assert len(images) == 10 and len(batches) == 12 and len(epochs) == 6
    assert not (images & batches) and not (images & epochs) and not (batches & epochs)
