"""Our engine extends Torchreid by subclassing only (nothing in Torchreid is patched), reads
images with our reader in every loader worker, and stops a diverging run before it can be
scored or saved."""
import importlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main
import reidkit.train.engine as engine_module
from reidkit.evaluate import metrics as evaluation
from reidkit.run.errors import UserError
from reidkit.train.engine import DivergenceWatch, ReidkitEngineMixin, SoftmaxEngine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_importing_our_modules_changes_nothing_in_torchreid():
    code = ('import torchreid.reid.metrics as m, torchreid.reid.engine.engine as e, '
            'torchreid.reid.data.datasets.dataset as d\n'
            'before = (m.evaluate_rank, e.visualize_ranked_results, d.read_image)\n'
            'import main, reidkit.train.engine, reidkit.search.command, reidkit.evaluate.visrank, reidkit.evaluate.metrics\n'
            'assert (m.evaluate_rank, e.visualize_ranked_results, d.read_image) == before\n'
            'print("unchanged")')
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and 'unchanged' in done.stdout, done.stderr[-2000:]


def test_every_evaluation_is_ours_and_nothing_in_torchreid_is_patched(tiny_settings,
                                                                     monkeypatch):
    """Plain, re-ranked and CUHK03 evaluations and visrank go through our evaluator and rank
    writer, called by our engine; Torchreid's module attributes are never replaced (each is
    a stand-in that fails if called, and is still the same object whenever ours runs)."""
    metrics = importlib.import_module('torchreid.reid.metrics')
    torchreid_engine = importlib.import_module('torchreid.reid.engine.engine')

    def never_called(*args, **kwargs):
        raise AssertionError("Torchreid's own evaluator or rank writer was called")
    monkeypatch.setattr(metrics, 'evaluate_rank', never_called)
    monkeypatch.setattr(torchreid_engine, 'visualize_ranked_results', never_called)
    seen = []

    def spying(module, name):
        function = getattr(module, name)

        def spy(*args, **kwargs):
            seen.append((name, metrics.evaluate_rank is never_called and
                         torchreid_engine.visualize_ranked_results is never_called))
            return function(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    for name in ('evaluate_features', 'evaluate_distances'):
        spying(evaluation, name)
    spying(engine_module, 'write_rankings')
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    save_dir = Path(tiny_settings.EXPERIMENTS_DIR) / 'run'
    engine.run(save_dir=str(save_dir), test_only=True)
    engine.run(save_dir=str(save_dir), test_only=True, rerank=True)          # our re-ranking
    engine.run(save_dir=str(save_dir), test_only=True, use_metric_cuhk03=True, visrank=True,
               visrank_topk=2)
    assert seen == [('evaluate_features', True), ('evaluate_distances', True),
                    ('evaluate_distances', True), ('write_rankings', True)]
    assert (save_dir / 'visrank_market1501' / 'index.html').is_file()
    assert len(engine.results) == 3 and all(0 < r['mAP'] <= 1 for r in engine.results)
    assert 0 < engine.results[0]['mINP'] <= engine.results[0]['mAP']
    assert engine.results[1]['mINP'] is not None and engine.results[2]['mINP'] is None


def test_our_evaluation_equals_torchreids_pipeline_on_the_same_features(tiny_settings,
                                                                        monkeypatch):
    """Our _evaluate (features kept on the device, chunked distances) against Torchreid's own
    _evaluate with its own distance matrix and our exact evaluator: the same numbers."""
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    engine.set_model_mode('eval')
    loaders = engine.test_loader['market1501']
    theirs_cmc = []

    def exact_in_torchreid(*args, **kwargs):
        cmc, mAP = evaluation.evaluate_rank(*args, **kwargs)
        theirs_cmc.append(cmc)
        return cmc, mAP
    monkeypatch.setattr(importlib.import_module('torchreid.reid.metrics'), 'evaluate_rank',
                        exact_in_torchreid)
    ours = engine._evaluate('market1501', loaders['query'], loaders['gallery'])
    theirs = super(ReidkitEngineMixin, engine)._evaluate('market1501', loaders['query'],
                                                         loaders['gallery'])
    assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
    assert ours[1] == pytest.approx(theirs[1], abs=1e-6)
    (result,) = engine.results
    assert (result['cmc'] == theirs_cmc[0]).all()


def _broken_jpeg(path: Path) -> None:
    """Starts and ends like a JPEG (so the pre-run check passes it) but cannot be decoded."""
    path.write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4 + b'\xff\xd9')


@pytest.mark.slow
def test_spawned_loader_workers_read_with_our_reader(tiny_settings, tmp_path):
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    dataset = engine.train_loader.dataset
    assert isinstance(dataset, engine_module.ReadingWithReidkit)
    broken = tmp_path / '0001_c1s1_000001_00.jpg'
    _broken_jpeg(broken)
    dataset.dataset.data[0] = (str(broken),) + tuple(dataset.dataset.data[0][1:])
    loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context='spawn')
    with pytest.raises(UserError) as error:
        list(loader)
    message = str(error.value)
    assert message.startswith(f'"{broken}" cannot be read as an image')
    assert 'Traceback' not in message and 'DataLoader worker' not in message


@pytest.mark.slow
def test_a_bad_image_found_by_a_loader_worker_is_one_paragraph(tiny_data_root, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data_root, data)
    train = data / 'market1501' / 'Market-1501-v15.09.15' / 'bounding_box_train'
    victims = sorted(train.glob('*.jpg'))[:10]     # more than an epoch's dropped remainder
    for victim in victims:
        _broken_jpeg(victim)
    from conftest import TINY
    args = [f'--{k}={v!r}' for k, v in dict(TINY, DATA_ROOT=str(data), WORKERS=2,
                                           EXPERIMENTS_DIR=str(tmp_path / 'exp')).items()]
    done = subprocess.run([sys.executable, 'main.py', 'train', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    (error,) = [line for line in done.stderr.splitlines() if line.startswith('error:')]
    assert any(error.startswith(f'error: "{victim}" cannot be read as an image')
               for victim in victims), error
    assert 'Traceback' not in done.stderr and 'DataLoader worker' not in done.stderr


def test_divergence_watch_finds_the_first_bad_batch_on_floats_and_device_tensors():
    watch = DivergenceWatch()
    watch.observe({'loss': 2.0, 'acc': math.nan}, epoch=0, batch=0)    # acc is not a loss
    assert watch.first_bad() is None
    watch.observe({'loss_x': torch.tensor(1.0), 'loss_t': torch.tensor(3.0)}, 1, 0)
    watch.observe({'loss_x': torch.tensor(float('inf')), 'loss_t': torch.tensor(1.0)}, 1, 7)
    watch.observe({'loss_x': torch.tensor(float('nan')), 'loss_t': torch.tensor(1.0)}, 1, 8)
    assert watch.first_bad() == (1, 7, 'loss_x', 'not finite')
    floats = DivergenceWatch()
    floats.observe({'loss': math.nan}, 2, 3)
    floats.observe({'loss': math.inf}, 2, 4)
    epoch, batch, name, value = floats.first_bad()
    assert (epoch, batch, name) == (2, 3, 'loss') and math.isnan(value)


@pytest.mark.slow
def test_a_diverging_run_stops_with_an_error_and_writes_no_checkpoint_after_it(
        tiny_settings, monkeypatch):
    original = SoftmaxEngine.parse_data_for_train

    def diverge_in_epoch_2(self, data):     # called by the training loop before each step
        if self.epoch == 1 and self.batch_idx >= 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float('nan'))
        return original(self, data)
    monkeypatch.setattr(SoftmaxEngine, 'parse_data_for_train', diverge_in_epoch_2)
    s = tiny_settings.replace(MAX_EPOCH=3, EVAL_FREQ=1)
    with pytest.raises(UserError) as error:
        main.train(s)
    (run_dir,) = Path(s.EXPERIMENTS_DIR).iterdir()
    good = run_dir / 'model' / 'model.pth.tar-1'
    # the step's losses stay on the device: checked there, reported as "not finite"
    assert str(error.value).startswith('Training diverged: the loss became not finite at '
                                       'epoch 2, batch 3 of 4')
    assert f'The last good checkpoint is "{good}"' in str(error.value)
    from reidkit.run.checkpoints import load_checkpoint
    for checkpoint in (run_dir / 'model').iterdir():   # nothing from the diverged epoch
        saved = load_checkpoint(checkpoint)
        assert saved['epoch'] == 1
        assert all(torch.isfinite(v).all() for v in saved['state_dict'].values()
                   if v.is_floating_point())
    assert not (run_dir / 'metrics.json').exists()


@pytest.mark.slow
def test_a_real_lr_of_1000_never_reports_a_score(tiny_data_root, tmp_path):
    from conftest import TINY
    args = [f'--{k}={v!r}' for k, v in dict(TINY, DATA_ROOT=str(tiny_data_root), LR=1000.0,
                                           MAX_EPOCH=2, EXPERIMENTS_DIR=str(tmp_path)).items()]
    done = subprocess.run([sys.executable, 'main.py', 'train', 'test', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert 'diverged' in done.stderr
    assert 'Rank-1' not in done.stdout and not list(tmp_path.rglob('metrics.json'))
    assert not list(tmp_path.rglob('model.pth.tar-*'))


@pytest.mark.parametrize('batch, message', [
    (1, 'BATCH_SIZE_TRAIN=1: training needs at least 2 images per batch'),
    (100_000, 'BATCH_SIZE_TRAIN=100000 is larger than the 73 training images')])
def test_a_batch_that_cannot_train_is_refused_before_any_work(tiny_settings, batch, message):
    with pytest.raises(UserError, match=message):
        main.train(tiny_settings.replace(BATCH_SIZE_TRAIN=batch))
    assert not Path(tiny_settings.EXPERIMENTS_DIR).exists()


def test_a_triplet_batch_needing_more_people_than_there_are_is_refused(tiny_settings):
    # 8 training identities: a batch of 36 would need 9 people, 4 images each.
    with pytest.raises(UserError, match="needs 9 different people per batch .* has 8. Use a "
                                        "batch of at most 32"):
        main.train(tiny_settings.replace(LOSS='triplet', BATCH_SIZE_TRAIN=36))
    assert not Path(tiny_settings.EXPERIMENTS_DIR).exists()


def test_flip_test_averages_an_image_with_its_mirror(tiny_settings):
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings.replace(FLIP_TEST=True), datamanager, model,
                               optimizer, scheduler)
    engine.set_model_mode('eval')
    images = torch.rand(3, 3, tiny_settings.HEIGHT, tiny_settings.WIDTH)
    with torch.no_grad():
        flipped = engine.test_features(images)
        plain = model(images)
        mirrored = model(images.flip(3))
        # A mirrored image gets the same features: the flip test is mirror-invariant.
        assert torch.allclose(engine.test_features(images.flip(3)), flipped, atol=1e-5)
    assert torch.allclose(flipped, (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-3)        # the test can tell them apart
    engine.flip_test = False
    with torch.no_grad():
        assert torch.allclose(engine.test_features(images), plain, atol=1e-6)


def test_re_ranking_in_the_engine_is_torchreids_on_the_same_features(tiny_settings):
    """RERANK through our engine: the same CMC and mAP as Torchreid's re_ranking applied to
    Torchreid's own distance matrices of the same features."""
    from torchreid.reid.metrics import compute_distance_matrix
    from torchreid.reid.utils.rerank import re_ranking
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    engine.set_model_mode('eval')
    loaders = engine.test_loader['market1501']
    with torch.no_grad():
        engine._evaluate('market1501', loaders['query'], loaders['gallery'], rerank=True)
        qf, q_pids, q_camids = engine._features(loaders['query'])
        gf, g_pids, g_camids = engine._features(loaders['gallery'])
    theirs = re_ranking(compute_distance_matrix(qf, gf).numpy(),
                        compute_distance_matrix(qf, qf).numpy(),
                        compute_distance_matrix(gf, gf).numpy())
    cmc, mAP = evaluation.evaluate_rank(theirs, q_pids.numpy(), g_pids.numpy(),
                                        q_camids.numpy(), g_camids.numpy())
    (ours,) = engine.results
    ours_cmc, ours_mAP = ours['cmc'], ours['mAP']
    assert (ours_cmc == cmc).all() and ours_mAP == pytest.approx(mAP, abs=1e-6)


class OnGpu(torch.Tensor):
    """Stands for a CUDA tensor on a machine without one: its device says cuda and numpy()
    refuses it, as PyTorch refuses a CUDA tensor; cpu() (or to('cpu')) gives a plain tensor."""

    @property
    def device(self):
        return torch.device('cuda', 0)

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)

    def to(self, *args, **kwargs):
        plain = self.as_subclass(torch.Tensor)
        return plain if torch.device(args[0] if args else kwargs['device']).type == 'cpu' \
            else plain.to(*args, **kwargs).as_subclass(OnGpu)


class LabelsOnGpu:
    """A test loader whose batches carry their labels on the GPU, as the device cache's do."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield dict(batch, pid=torch.as_tensor(batch['pid']).as_subclass(OnGpu),
                       camid=torch.as_tensor(batch['camid']).as_subclass(OnGpu))


def test_labels_reach_the_evaluator_on_the_cpu_when_the_loader_gives_them_on_a_gpu(
        tiny_settings):
    """The device cache yields pids and camids on the GPU; CUHK03's protocol reads them with
    numpy(), so the engine moves them to the host once, where the features are collected."""
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    engine.set_model_mode('eval')
    loaders = engine.test_loader['market1501']
    query, gallery = LabelsOnGpu(loaders['query']), LabelsOnGpu(loaders['gallery'])
    with torch.no_grad():
        _, pids, camids = engine._features(query)
        assert type(pids) is torch.Tensor and type(camids) is torch.Tensor
        engine._evaluate('market1501', query, gallery, use_metric_cuhk03=True)
        engine._evaluate('market1501', loaders['query'], loaders['gallery'],
                         use_metric_cuhk03=True)
    on_gpu, plain = engine.results
    assert (on_gpu['cmc'] == plain['cmc']).all() and on_gpu['mAP'] == plain['mAP']
