"""Training samplers: reproducible augmentation and exactly resumable batches."""
import numpy as np
import paddle


class SeededSamples(paddle.io.Dataset):
    """A training dataset whose augmentation depends only on (seed, epoch, sample index).

    ``rng`` is the RandomState the dataset's augmentation draws from; it is
    reseeded before every sample. Batches are then the same however they are
    spread over DataLoader workers, and a resumed run sees exactly the images
    an uninterrupted run would have.
    """

    def __init__(self, dataset, rng, seed):
        self.dataset = dataset
        self.rng = rng
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Call before creating the epoch's DataLoader iterator (workers copy the dataset then)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.rng.seed(int(seed))
        return self.dataset[index]


class ResumableBatchSampler(paddle.io.DistributedBatchSampler):
    """Shuffled, drop_last DistributedBatchSampler over a window [start_batch, end_batch) of an epoch.

    The parent shuffles with ``np.random.RandomState(epoch)``, so skipping the
    first batches of an epoch yields exactly the batches an uninterrupted run
    would have continued with. Ending the window at the last iteration to run
    lets the DataLoader iterator finish by itself: an iterator abandoned
    mid-way keeps its worker processes alive, one set per epoch.
    Each device gets its slice of every global batch.
    num_replicas/rank default to the distributed environment's, as in the parent.
    """

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.start_batch, self.end_batch = 0, None

    def set_epoch(self, epoch, start_batch=0, end_batch=None):
        """Batches start_batch..end_batch-1 of ``epoch`` (end_batch None: to the end of the epoch)."""
        super().set_epoch(epoch)
        self.start_batch, self.end_batch = start_batch, end_batch

    def __iter__(self):
        batches = super().__iter__()
        for _ in range(self.start_batch):
            next(batches)
        for _ in range(len(self)):
            yield next(batches)

    def __len__(self):
        end = super().__len__() if self.end_batch is None else min(self.end_batch, super().__len__())
        return max(end - self.start_batch, 0)
