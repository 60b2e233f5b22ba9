"""Torchreid's engines, extended by subclassing (the hook Torchreid documents) and nothing else.

Torchreid's `run()` calls `train()` and `test()`, and `test()` calls `_evaluate()` for each
target: we override those, so the evaluation is ours (`reidkit.evaluate`: the exact evaluator,
re-ranking and rank writer, called directly) and its results are kept on the engine. Its data
loaders read images with our reader through a picklable dataset wrapper (so spawned loader
workers use it too). No Torchreid function is patched, and importing any module changes nothing
in Torchreid.

Training runs Torchreid's epoch loop around our step (reidkit.train.step.TrainStep: Torchreid's
losses computed on the device, tested equal to them). Added around it and Torchreid's
evaluation: checkpoints written atomically with the run's settings, the centre loss's centres
and every process's random generators' state inside (a resumed run draws what the uninterrupted
one would have; evaluations draw nothing from training's), a rolling checkpoint to resume from,
the last epoch's checkpoint written before the final evaluation, a stop with a clear error when
the loss stops being finite (no checkpoint of a diverged model is ever written), re-ranking in
the evaluations during training too, progress bars on feature extraction, and a record of every
evaluation in `results`.
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchreid.reid.engine import ImageSoftmaxEngine, ImageTripletEngine

from reidkit.data.datapath import CachedLoader, loader_like
from reidkit.data.images import read_image
from reidkit.data.own_dataset import display_labels
from reidkit.data.training_files import CHECKPOINT_KEY
from reidkit.evaluate import metrics as evaluation
from reidkit.evaluate.report import BestEffortWriter, print_scores, target_names
from reidkit.evaluate.rerank import Reranking, re_ranking_features
from reidkit.evaluate.verification import PairScores, describe
from reidkit.evaluate.visrank import market_label, write_rankings
from reidkit.run import distributed
from reidkit.run.checkpoints import (CENTERS_KEY, LATEST_NAME, checkpoint_path,
                                     drop_optimizer_states, link_latest, model_state,
                                     save_checkpoint, unwrap)
from reidkit.run.errors import UserError
from reidkit.run.progress import progress
from reidkit.run.folders import resume_point
from reidkit.run.model import freeze_neck_bias
from reidkit.run.randomness import CHECKPOINT_KEY as RANDOM_STATE_KEY, host_random_state, \
    restore_host_random_state, unchanged_randomness
from reidkit.run.settings import display_name
from reidkit.train.step import RunningMeans


@dataclass(frozen=True)
class EngineOptions:
    """What our engine takes besides Torchreid's arguments, from the run's settings."""
    model_name: str = 'unknown'        # stored in checkpoints, named in mismatch errors
    settings: dict | None = None       # the run's settings, stored in every checkpoint
    latest_every: int = 1              # epochs between rolling checkpoints (0: never)
    keep_optimizer: int = 1            # newest numbered checkpoints that keep the optimiser's state
    flip_test: bool = False            # test features of the image and its mirror, averaged
    rerank: Reranking = field(default_factory=Reranking)   # its parameters, where it is on
    training_files: dict | None = None  # the run's training files (reidkit.data.training_files)
    match_fpir: float = 0.01           # the FPIR the open-set match threshold is picked at
    seed: int = 1                      # the held-out split of the open-set estimate


class ReidkitEngineMixin:
    """What our engines add to Torchreid's (see the module's docstring)."""

    def __init__(self, *args, options: EngineOptions = EngineOptions(), train_step=None,
                 loaders=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flip_test = options.flip_test       # features of the image and its mirror, averaged
        self.rerank = options.rerank             # k-reciprocal re-ranking's parameters
        self.train_step = train_step             # reidkit.train.step.TrainStep: the only step
        self.model_name = options.model_name     # stored in checkpoints, named in mismatch errors
        self.latest_every = options.latest_every  # epochs between rolling checkpoints (0: never)
        self.keep_optimizer = options.keep_optimizer    # the others: weights only
        self.settings = options.settings         # the run's settings, stored in every checkpoint
        self.training_files = options.training_files    # stored in every checkpoint
        self.match_fpir, self.seed = options.match_fpir, options.seed   # open-set threshold
        # every target's evaluation: {'epoch', 'target', 'dataset', 'cmc', 'mAP', 'mINP',
        # counts (metrics.Labels.counts), 'verification', 'open_set' (None with re-ranking),
        # 'curves' (verification.Curves, for the pictures)}; the last test()'s, one per
        # target: last_evaluation
        self.results: list = []
        self.last_evaluation: list = []
        self.save_dir = None
        self.final_checkpoint = None       # written when training ends, before its evaluation
        self._rerank = False               # run()'s rerank, for the evaluations in training
        self.divergence = DivergenceWatch()
        self._print_freq = 10
        self._random_state = None          # a resumed run's, restored as training starts
        # images decoded once, augmented on the device (no training loader when evaluating)
        train_loader, test_loader = loaders if loaders is not None else (None, None)
        self.train_loader = reading_with_reidkit(self.train_loader) if train_loader is None \
            else train_loader
        self.test_loader = test_loader if test_loader is not None else \
            {name: {split: reading_with_reidkit(loader) for split, loader in splits.items()}
             for name, splits in self.test_loader.items()}

    def run(self, save_dir='log', *args, **kwargs):
        self.save_dir = Path(save_dir)
        self._print_freq = kwargs.get('print_freq', self._print_freq)
        # Torchreid's run() passes `rerank` to test() only with test_only=True; test() takes
        # it from here, so the evaluations during and after training re-rank too.
        self._rerank = bool(kwargs.get('rerank', False))
        if not distributed.current().is_main:
            self.writer = NoWriter()          # one set of TensorBoard events, rank 0's
        elif self.writer is None and not kwargs.get('test_only', False):
            self.writer = BestEffortWriter(save_dir)    # a full disk: a note, training goes on
        try:
            return super().run(save_dir, *args, **kwargs)
        finally:
            if self.writer is not None:
                self.writer.close()
            self._rerank = False

    def _stop_if_diverged(self) -> None:
        found = self.divergence.first_bad()
        device = next(self.model.parameters()).device
        if not distributed.any_rank(found is not None, device):
            return
        # Under DDP every rank checks at the same batch and stops together (none waits for a
        # peer that has stopped); a rank whose own losses were finite names the others'.
        epoch, batch, name, value = found or (self.epoch, self.batch_idx,
                                              'loss of another process', 'not finite')
        last = resume_point(self.save_dir) if self.save_dir is not None else None
        lr = self.optimizer.param_groups[0]['lr'] if self.optimizer is not None else None
        raise UserError(
            f'Training diverged: the {name} became {value} at epoch {epoch + 1}, batch '
            f'{batch + 1} of {self.num_batches}'
            + (f' (learning rate {lr:g})' if lr is not None else '') + '. Nothing was saved '
            'after it, and no result is reported for a diverged model. '
            + (f'The last good checkpoint is "{last}". ' if last else
               'No checkpoint had been written yet. ')
            + 'Start a new run with a lower LR (e.g. a tenth), or check the data and settings.'
        )

    def random_states(self) -> list[dict]:
        """What a checkpoint keeps of the run's random generators, one dict per process in
        rank order (each DDP process draws from its own seed): the host's and the device data
        path's. Under DDP every process must call it (an all-gather)."""
        state = host_random_state()
        if isinstance(self.train_loader, CachedLoader):
            state['data_path'] = self.train_loader.transform.random_state()
        return distributed.gather_objects(state)

    def continue_randomness(self, states: list[dict] | None) -> None:
        """A resumed run draws on from its checkpoint's random states (restored as its first
        epoch starts, after everything built before): the batches, augmentations and dropout
        of the uninterrupted run. None (an older checkpoint) or another number of processes:
        the run's seed, as before, said in a note."""
        process = distributed.current()
        if states and len(states) == process.world_size:
            self._random_state = states[process.rank]
            return
        print('Note: ' + ('the checkpoint holds no random generators\' state (written by an '
                          'older version)' if not states else
                          f'the checkpoint holds the random generators of {len(states)} '
                          f'processes and this run has {process.world_size}')
              + ', so from here on the batches and augmentations differ from those of an '
                'uninterrupted run (equally random, from SEED).')

    def train(self, print_freq=10, fixbase_epoch=0, open_layers=None):
        self._print_freq = print_freq
        if self._random_state is not None:
            restore_host_random_state(self._random_state)
            if isinstance(self.train_loader, CachedLoader):
                self.train_loader.transform.set_random_state(
                    self._random_state.get('data_path', {}))
            self._random_state = None
        sampler = getattr(self.train_loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):     # DDP: a new split of the data every epoch
            sampler.set_epoch(self.epoch)
        self._train_epoch(print_freq, fixbase_epoch, open_layers)
        self._stop_if_diverged()             # the epoch's last batches, before any checkpoint
        done = self.epoch + 1
        if self.save_dir is None:
            return
        if done == self.max_epoch:
            # The final checkpoint, before the final evaluation (which Torchreid's run() does
            # first): whatever happens there, the trained weights are on disk.
            for name in self.get_model_names():
                path = self._save(name, done, float('nan'),
                                  checkpoint_path(self.save_dir, done, name))
                print(f'Checkpoint saved to "{path}" (before the final evaluation)')
                self.final_checkpoint = path
        elif self.latest_every > 0 and done % self.latest_every == 0:
            # A rolling checkpoint to resume from after Ctrl-C or a crash.
            for name in self.get_model_names():
                self._save(name, done, float('nan'), self.save_dir / name / LATEST_NAME)

    def _train_epoch(self, print_freq: int, fixbase_epoch: int, open_layers) -> None:
        """One epoch of Torchreid's loop around our TrainStep. The step returns device tensors
        and running means stay on the device: the host reads them (one sync) only for the log
        line and TensorBoard, every PRINT_FREQ batches and at the epoch's end, and the
        non-finite check follows the same rhythm."""
        self.set_model_mode('train')
        self.two_stepped_transfer_learning(self.epoch, fixbase_epoch, open_layers)
        self.num_batches = len(self.train_loader)
        means = RunningMeans()
        started = time.time()
        for self.batch_idx, data in enumerate(self.train_loader):
            images, pids = self.parse_data_for_train(data)
            values = self.train_step(images, pids)
            means.add(values)
            self.divergence.observe(values, self.epoch, self.batch_idx)
            done = self.batch_idx + 1
            if done % print_freq == 0 or done == self.num_batches:
                self._stop_if_diverged()
                self._log_training(means.means(), done, time.time() - started)
        self.update_lr()

    def _log_training(self, values: dict, done: int, seconds: float) -> None:
        """The printed line (Torchreid's layout) and the TensorBoard scalars: epoch means."""
        per_batch = seconds / done
        left = self.num_batches - done + (self.max_epoch - self.epoch - 1) * self.num_batches
        print(f'epoch: [{self.epoch + 1}/{self.max_epoch}][{done}/{self.num_batches}]\t'
              f'time {per_batch:.3f}\teta {datetime.timedelta(seconds=int(per_batch * left))}\t'
              + '\t'.join(f'{name} {value:.4f}' for name, value in values.items())
              + f'\tlr {self.get_current_lr():.6f}')
        if self.writer is not None:
            step = self.epoch * self.num_batches + self.batch_idx
            self.writer.add_scalar('Train/time', per_batch, step)
            for name, value in values.items():
                self.writer.add_scalar(f'Train/{name}', value, step)
            self.writer.add_scalar('Train/lr', self.get_current_lr(), step)

    def save_model(self, epoch, rank1, save_dir, is_best=False):
        for name in self.get_model_names():
            path = self._save(name, epoch + 1, rank1,
                              checkpoint_path(Path(save_dir), epoch + 1, name))
            if path != self.final_checkpoint:   # that one was named before the final evaluation
                print(f'Checkpoint saved to "{path}"')
            self._store_once(path)

    def _store_once(self, numbered: Path) -> None:
        """After a numbered checkpoint: a latest.pth.tar of the same epoch (written before its
        evaluation) becomes the same file (`link_latest`; one of an earlier epoch stays), and
        the numbered ones but the newest KEEP_OPTIMIZER lose their optimiser state (a third of
        the size; weights for test, visrank and search)."""
        if not distributed.current().is_main:
            return
        link_latest(numbered)
        drop_optimizer_states(numbered.parent, self.keep_optimizer)

    def _save(self, name: str, epoch: int, rank1: float, path: Path) -> Path:
        """Writes a checkpoint, never one of a model whose weights are not finite. Under DDP
        every rank holds the same weights and rank 0 writes them."""
        states = self.random_states()      # every process's (an all-gather under DDP)
        if not distributed.current().is_main:
            return path
        centers = getattr(self.train_step, 'centers', None)   # the centre loss's, if on
        weights = unwrap(self._models[name]).state_dict()
        if centers is not None:
            weights = {**weights, 'centre loss centres': centers.centers}
        for key, value in weights.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise UserError(
                    f'Training diverged: the weights ({key}) are no longer finite after epoch '
                    f'{epoch}, so no checkpoint was written. Start a new run with a lower LR.')
        state = model_state(self, name, epoch, rank1, self.model_name)
        state['settings'] = self.settings
        if centers is not None:
            state[CENTERS_KEY] = centers.state_dict()
        state[RANDOM_STATE_KEY] = states     # where the next epoch's draws start
        if self.training_files is not None:
            state[CHECKPOINT_KEY] = self.training_files
        return save_checkpoint(state, path)

    @torch.no_grad()
    def _evaluate(self, dataset_name='', query_loader=None, gallery_loader=None,
                  dist_metric='euclidean', normalize_feature=False, visrank=False,
                  visrank_topk=10, save_dir='', use_metric_cuhk03=False, ranks=(1, 5, 10, 20),
                  rerank=False):
        """Torchreid's evaluation of one target (its signature), by our evaluator: features
        kept on the model's device and distances computed there in query chunks (never a full
        distance matrix on the host, unless visrank draws it, re-ranking needs it or CUHK03's
        protocol does); re-ranking is ours (`reidkit.evaluate.rerank`, from each image's
        nearest neighbours). Every switch (metric, FLIP_TEST, re-ranking) applies to every
        protocol, CUHK03's too, and the evaluation line names them. Prints the ranks in
        `ranks` that the gallery has and the verification and open-set block
        (`reidkit.evaluate.verification`, on the same distances: its pairs collected and its
        negatives counted in the CMC pass), records the scores in `results` and
        returns (Rank-1, mAP)."""
        if use_metric_cuhk03 and distributed.current().distributed:
            raise UserError('The CUHK03 metric is evaluated by one process: run python '
                            'main.py test --GPUS=1 (or without torchrun) on the checkpoint '
                            'this run wrote.')
        qf, gf, labels = self._query_and_gallery(query_loader, gallery_loader, dataset_name)
        if normalize_feature:
            qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        print(f'Computing CMC and mAP with metric={dist_metric}'
              + (', flip test' if self.flip_test else '')
              + (f', re-ranking ({self.rerank})' if rerank else '')
              + (", CUHK03's single-gallery-shot CMC" if use_metric_cuhk03 else '') + ' ...')
        distmat = None                       # a full matrix only where one is needed
        if rerank:
            distmat = torch.from_numpy(re_ranking_features(qf, gf, self.rerank,
                                                           metric=dist_metric))
        elif use_metric_cuhk03:
            distmat = evaluation.distances(qf, gf, dist_metric)
        rows = evaluation.distance_rows(qf, gf, dist_metric) if distmat is None else \
            evaluation.matrix_rows(distmat)
        pairs = PairScores(labels)           # verification's pairs, counted as CMC ranks
        if distmat is None:
            pairs.expect(rows)
            scores = evaluation.evaluate_features(qf, gf, labels, dist_metric,
                                                  observe=pairs.observe)
        else:
            scores = evaluation.evaluate_distances(distmat, labels,
                                                   single_gallery_shot=use_metric_cuhk03)
            pairs.collect(rows)
        verification, open_set, curves = pairs.finish(
            rows, distance=dist_metric, flip_test=self.flip_test, rerank=rerank,
            match_fpir=self.match_fpir, seed=self.seed)
        name = target_names(self.datamanager.targets).get(dataset_name,
                                                          display_name(dataset_name))
        self.results.append({'epoch': self.epoch + 1, 'target': name, 'dataset': dataset_name,
                             **scores._asdict(), **labels.counts(),
                             'verification': verification, 'open_set': open_set,
                             'curves': curves})
        print_scores(scores, ranks, labels.num_gallery)
        print('\n'.join(describe(verification, open_set)))
        if visrank and distributed.current().is_main:
            if distmat is None:
                distmat = evaluation.distances(qf, gf, dist_metric)
            write_rankings(distmat.cpu().numpy(),
                           self.datamanager.fetch_test_loaders(dataset_name),
                           Path(save_dir) / f'visrank_{name}', visrank_topk,
                           labeller=display_labels(dataset_name) or (
                               market_label if dataset_name == 'market1501' else None),
                           curves=curves)
        return scores.cmc[0], scores.mAP

    def _query_and_gallery(self, query_loader, gallery_loader, dataset_name=''):
        """(query features, gallery features, their `Labels`), as Torchreid prints them. The
        labels carry file ids (a query is never matched with its own file) from the target's
        items, which the loaders give in order."""
        print('Extracting features from query set ...')
        qf, q_pids, q_camids = self._features(query_loader)
        print(f'Done, obtained {qf.size(0)}-by-{qf.size(1)} matrix')
        print('Extracting features from gallery set ...')
        gf, g_pids, g_camids = self._features(gallery_loader)
        print(f'Done, obtained {gf.size(0)}-by-{gf.size(1)} matrix')
        labels = evaluation.Labels.of(q_pids, g_pids, q_camids, g_camids)
        items = self.datamanager.test_dataset.get(dataset_name, {})
        query, gallery = items.get('query', ()), items.get('gallery', ())
        if (len(query), len(gallery)) == (len(qf), len(gf)):   # the items these features are of
            labels = labels.with_files([item[0] for item in query], [item[0] for item in gallery])
        return qf, gf, labels

    def _features(self, loader):
        """(features on the model's device, pids, camids) of every image the loader gives;
        the labels on the host, whatever device the loader gives them on (CUHK03's protocol
        reads them with numpy)."""
        device = next(self.model.parameters()).device
        features, pids, camids = [], [], []
        for data in loader:
            images, batch_pids, batch_camids = self.parse_data_for_eval(data)
            features.append(self.test_features(images.to(device, non_blocking=True)))
            pids.append(torch.as_tensor(batch_pids))
            camids.append(torch.as_tensor(batch_camids))
        if not distributed.current().distributed:     # the labels moved once, not per batch
            return torch.cat(features), torch.cat(pids).cpu(), torch.cat(camids).cpu()
        # DDP: each rank extracted its slice; every rank gets all of them, in order.
        labels = torch.stack([torch.cat(pids), torch.cat(camids)], 1).to(device)
        features, labels = distributed.gather(torch.cat(features)), distributed.gather(labels)
        return features, labels[:, 0].cpu(), labels[:, 1].cpu()

    def test_features(self, images: torch.Tensor) -> torch.Tensor:
        """The model's features of a batch, in float32; with FLIP_TEST the mean of the
        features of the images and of their mirror images (`metrics.flip_averaged`)."""
        if self.flip_test:
            return evaluation.flip_averaged(self.extract_features, images)
        return self.extract_features(images).float()

    def test(self, *args, **kwargs):
        """Torchreid's test() (it calls our `_evaluate` for each target), with progress bars
        on feature extraction and run()'s `rerank` during training too; its results, one per
        target, are kept in `last_evaluation`. Returns the first target's Rank-1."""
        if len(args) < 8:                    # rerank is test()'s eighth parameter
            kwargs.setdefault('rerank', self._rerank)
        loaders = self.test_loader
        self.test_loader = {name: {split: WithProgress(loader, f'{name} {split} features')
                                   for split, loader in splits.items()}
                            for name, splits in loaders.items()}
        first = len(self.results)
        try:
            with unchanged_randomness():     # training draws as if no evaluation had run
                super().test(*args, **kwargs)
        finally:
            self.test_loader = loaders
        self.last_evaluation = self.results[first:]
        # The first target's Rank-1 (Torchreid returns the last's), as metrics.json's top
        # level gives it: the checkpoint saved after this records it.
        return float(self.last_evaluation[0]['cmc'][0])

    def two_stepped_transfer_learning(self, epoch, fixbase_epoch, open_layers, model=None):
        """Torchreid's FIXBASE_EPOCH/OPEN_LAYERS, on the model itself: Torchreid looks the
        layers up on the model it is given and unwraps only DataParallel, not DDP nor the fast
        path's FastModel. Frozen layers have no gradient, so every optimiser skips them; the
        neck's bias (NECK='bnneck') stays frozen when its layer opens."""
        model = unwrap(self.model) if model is None else model
        super().two_stepped_transfer_learning(epoch, fixbase_epoch, open_layers, model=model)
        freeze_neck_bias(model)


class NoWriter:
    """A TensorBoard writer that writes nothing (DDP ranks other than 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class DivergenceWatch:
    """The first batch whose loss was not finite. Losses that are still tensors on the device
    are checked there (no host sync per batch); `first_bad()` reads the flag."""

    def __init__(self):
        self._found = None                 # (epoch, batch, name, value) from a float loss
        self._flags: list = []             # (epoch, batch, name, device flag) for tensors

    def observe(self, summary: dict, epoch: int, batch: int) -> None:
        if self._found is not None:
            return
        for name, value in summary.items():
            if 'loss' not in name:
                continue
            if isinstance(value, torch.Tensor):
                self._flags.append((epoch, batch, name, (~torch.isfinite(value.detach())).any()))
            elif not math.isfinite(value):
                self._found = (epoch, batch, name, value)
                return

    def first_bad(self):
        """(epoch, batch, loss name, value) of the first non-finite loss seen, or None."""
        if self._found is None and self._flags:
            flags = torch.stack([flag for *_, flag in self._flags]).cpu()   # one sync
            bad = flags.nonzero()
            if len(bad):
                epoch, batch, name, _ = self._flags[int(bad[0])]
                self._found = (epoch, batch, name, 'not finite')
            self._flags = []
        return self._found


class ReadingWithReidkit(Dataset):
    """A Torchreid image dataset whose images are read by `reidkit.data.images.read_image` (an
    unreadable file is an error naming it, where Torchreid's reader retries it forever).
    Picklable, so loader workers started by spawn read the same way."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        path, pid, camid, dsetid = self.dataset.data[index]
        image = read_image(path)
        if self.dataset.transform is not None:
            image = self.dataset._transform_image(self.dataset.transform, self.dataset.k_tfm,
                                                  image)
        return {'img': image, 'pid': pid, 'camid': camid, 'impath': path, 'dsetid': dsetid}


def reading_with_reidkit(loader: DataLoader) -> DataLoader:
    """The same loader (sampler, batch size, workers), over a `ReadingWithReidkit` dataset."""
    if not hasattr(loader.dataset, 'data') or isinstance(loader.dataset, ReadingWithReidkit):
        return loader                       # not a Torchreid image dataset: left as it is
    return loader_like(loader, dataset=ReadingWithReidkit(loader.dataset))


class WithProgress:
    """A data loader that shows a progress bar (count, rate, ETA) each time it is iterated."""

    def __init__(self, loader, description: str):
        self.loader, self.description = loader, description

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(progress(self.loader, desc=self.description, unit='batch', leave=False))


class SoftmaxEngine(ReidkitEngineMixin, ImageSoftmaxEngine):
    pass


class TripletEngine(ReidkitEngineMixin, ImageTripletEngine):
    pass
