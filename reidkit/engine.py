"""Torchreid's engines, with safe atomic checkpoints, a rolling checkpoint to resume from,
progress bars on feature extraction and a record of every evaluation.

`run`, `train`, `save_model` and `test` are extended around calls to Torchreid's own: the
training step and the evaluation are Torchreid's.
"""
from __future__ import annotations

from pathlib import Path

from torchreid.reid.engine import ImageSoftmaxEngine, ImageTripletEngine
from tqdm import tqdm

from reidkit import evaluation
from reidkit.checkpoints import LATEST_NAME, checkpoint_path, model_state, save_checkpoint


class RecordingMixin:
    """Checkpoints written atomically with plain-typed fields; evaluations kept in `results`."""

    def __init__(self, *args, model_name: str = 'unknown', latest_every: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_name = model_name       # stored in checkpoints, named in mismatch errors
        self.latest_every = latest_every   # epochs between rolling checkpoints (0: never)
        self.results: list = []            # every evaluation: {'epoch', 'cmc', 'mAP'}
        self.save_dir = None

    def run(self, save_dir='log', *args, **kwargs):
        self.save_dir = Path(save_dir)
        return super().run(save_dir, *args, **kwargs)

    def train(self, *args, **kwargs):
        super().train(*args, **kwargs)
        done = self.epoch + 1
        if self.save_dir is not None and self.latest_every > 0 and done % self.latest_every == 0 \
                and done < self.max_epoch:
            # A rolling checkpoint to resume from after Ctrl-C or a crash.
            for name in self.get_model_names():
                state = model_state(self, name, done, float('nan'), self.model_name)
                save_checkpoint(state, self.save_dir / name / LATEST_NAME)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        for name in self.get_model_names():
            state = model_state(self, name, epoch + 1, rank1, self.model_name)
            path = save_checkpoint(state, checkpoint_path(Path(save_dir), epoch + 1, name))
            print(f'Checkpoint saved to "{path}"')

    def test(self, *args, **kwargs):
        loaders = self.test_loader
        self.test_loader = {name: {split: WithProgress(loader, f'{name} {split} features')
                                   for split, loader in splits.items()}
                            for name, splits in loaders.items()}
        try:
            with evaluation.record_evaluations() as results:
                rank1 = super().test(*args, **kwargs)
        finally:
            self.test_loader = loaders
        for cmc, mAP in results:
            self.results.append({'epoch': self.epoch + 1, 'cmc': cmc, 'mAP': mAP})
        return rank1


class WithProgress:
    """A data loader that shows a progress bar (count, rate, ETA) each time it is iterated."""

    def __init__(self, loader, description: str):
        self.loader, self.description = loader, description

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(tqdm(self.loader, desc=self.description, unit='batch', leave=False))


class SoftmaxEngine(RecordingMixin, ImageSoftmaxEngine):
    pass


class TripletEngine(RecordingMixin, ImageTripletEngine):
    pass
