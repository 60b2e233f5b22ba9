"""Small or odd test sets: a gallery smaller than a printed rank is evaluated (the ranks it has
are printed), a test set with nothing to match is refused before any work, and a final
evaluation that fails never loses the last epoch."""
import json
import re
import shlex
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

import main
from reidkit.data import checks, market
from reidkit.data.market import market_data_dir
from reidkit.run.checkpoints import load_checkpoint, unwrap
from reidkit.run.errors import UserError
from reidkit.train.engine import SoftmaxEngine


def _pid_cam(path: Path) -> tuple[int, int]:
    match = market.LOADER_NAME.search(path.name)
    return int(match.group(1)), int(match.group(2))


def market_subset(source_root: Path, root: Path, keep_query, keep_gallery) -> Path:
    """A copy of a Market-layout dataset under `root` with its whole training split and the
    query and gallery images for which keep_query / keep_gallery((pid, camera)) is true."""
    source, target = market_data_dir(source_root), market_data_dir(root)
    shutil.copytree(source / 'bounding_box_train', target / 'bounding_box_train')
    for split, keep in (('query', keep_query), ('bounding_box_test', keep_gallery)):
        (target / split).mkdir()
        for image in sorted((source / split).glob('*.jpg')):
            if keep(_pid_cam(image)):
                shutil.copy(image, target / split / image.name)
    return root


def first_people(source_root: Path, count: int) -> dict[int, int]:
    """{pid: the first camera its gallery images come from} for the first `count` people."""
    cameras = {}
    for image in sorted((market_data_dir(source_root) / 'bounding_box_test').glob('*.jpg')):
        pid, cam = _pid_cam(image)
        if pid > 0 and len(cameras) < count:
            cameras.setdefault(pid, cam)
    return cameras


@pytest.fixture
def tiny_gallery(tiny_data_root, tmp_path) -> Path:
    """3 gallery images (one per person, one camera each) and those people's queries, which
    come from 2-4 cameras: every person has a query with a match from another camera."""
    cameras = first_people(tiny_data_root, 3)
    kept = set()

    def one_image_per_person(pid_cam):
        pid, cam = pid_cam
        if cameras.get(pid) == cam and pid not in kept:
            kept.add(pid)
            return True
        return False
    return market_subset(tiny_data_root, tmp_path / 'tiny-gallery',
                         lambda pid_cam: pid_cam[0] in cameras, one_image_per_person)


@pytest.fixture
def untrained_checkpoint(tmp_path) -> Path:
    """A resnet18 checkpoint at 32x16 (8 training identities), as test loads it."""
    from torchreid.reid.models import build_model
    torch.manual_seed(0)
    model = build_model('resnet18', num_classes=8, pretrained=False)
    path = tmp_path / 'resnet18.pth'
    torch.save({'state_dict': model.state_dict(), 'model_name': 'resnet18', 'epoch': 0,
                'input_size': [32, 16]}, path)
    return path


def test_matchable_queries_are_counted_from_the_labels():
    gallery = [(1, 0), (1, 0), (2, 1), (0, 2)]
    assert checks.count_matchable_queries([(1, 1), (2, 1), (3, 0)], gallery) == 1
    assert checks.count_matchable_queries([(1, 0), (2, 1)], gallery) == 0   # same camera only
    assert checks.count_matchable_queries([], gallery) == 0


def duke_copy(source_root: Path, root: Path, keep_query, keep_gallery) -> Path:
    """`market_subset`'s data in DukeMTMC-reID's layout (DATA_ROOT/dukemtmc-reid/DukeMTMC-reID/,
    no junk: Duke's loader has none), read by Torchreid's DukeMTMC-reID loader."""
    market_subset(source_root, root / 'market', keep_query, keep_gallery)
    duke = root / 'dukemtmc-reid' / 'DukeMTMC-reID'
    shutil.copytree(market_data_dir(root / 'market'), duke,
                    ignore=lambda folder, names: [n for n in names if n.startswith('-1_')])
    shutil.rmtree(root / 'market')
    return root


def test_a_test_set_of_another_torchreid_dataset_with_nothing_to_match_is_refused(
        tiny_data_root, tmp_path, tiny_settings):
    """Any Torchreid dataset, from the labels its own loader gives, before any work."""
    cameras = first_people(tiny_data_root, 3)
    same_camera = lambda pid_cam: cameras.get(pid_cam[0]) == pid_cam[1]      # noqa: E731
    root = duke_copy(tiny_data_root, tmp_path / 'duke', same_camera, same_camera)
    s = tiny_settings.replace(DATA_ROOT=str(root), SOURCES='dukemtmcreid',
                              TARGETS='dukemtmcreid')
    with pytest.raises(UserError, match="'dukemtmcreid' has nothing to match: none of its 3 "
                                        "query images .*as its loader reads it"):
        checks.check_before_run(s, training=False)
    assert not Path(s.EXPERIMENTS_DIR).exists()
    root = duke_copy(tiny_data_root, tmp_path / 'duke-ok', lambda pid_cam: pid_cam[0] in cameras,
                     lambda pid_cam: True)
    checks.check_before_run(s.replace(DATA_ROOT=str(root)), training=False)


def test_nothing_to_match_is_refused_before_training_or_extraction(tiny_data_root, tmp_path,
                                                                   tiny_settings,
                                                                   untrained_checkpoint):
    """Each query's person is in the gallery only in the query's own camera."""
    cameras = first_people(tiny_data_root, 3)
    root = market_subset(tiny_data_root, tmp_path / 'no-match',
                         lambda pid_cam: cameras.get(pid_cam[0]) == pid_cam[1],
                         lambda pid_cam: cameras.get(pid_cam[0]) == pid_cam[1])
    s = tiny_settings.replace(DATA_ROOT=str(root))
    with pytest.raises(UserError, match="TARGETS: the test set 'market1501' has nothing to "
                                        "match: none of its 3 query images .* Nothing was "
                                        "trained or extracted"):
        main.train(s)
    assert not Path(s.EXPERIMENTS_DIR).exists()          # before any run folder or training
    with pytest.raises(UserError, match='has nothing to match'):
        main.test(s, weights=untrained_checkpoint)
    assert not list(Path(s.EXPERIMENTS_DIR).rglob('metrics.json'))


@pytest.mark.slow
def test_a_gallery_smaller_than_rank_5_is_evaluated(tiny_gallery, tiny_settings,
                                                    untrained_checkpoint, capsys):
    s = tiny_settings.replace(DATA_ROOT=str(tiny_gallery), RERANK=True)
    out_dir = main.test(s, weights=untrained_checkpoint)
    printed = capsys.readouterr().out
    assert 'Rank-1  :' in printed and 'Rank-5' not in printed.replace('(no Rank-5', '')
    assert '(no Rank-5 or above: the CMC curve stops at rank 3, the size of the gallery)' in printed
    metrics = json.loads((out_dir / 'metrics.json').read_text())
    assert metrics['num_gallery'] == 3 and len(metrics['cmc']) == 3
    assert metrics['rank1'] == metrics['cmc'][0] and 'rank5' not in metrics
    vis_dir = main.vis_rank(s.replace(RERANK=False), weights=untrained_checkpoint)
    assert (vis_dir / 'metrics.json').is_file()
    assert (vis_dir / 'visrank_market1501' / 'index.html').is_file()

    # CUHK03's protocol, which went through Torchreid's own rank print.
    s = s.replace(MODEL_NAME='resnet18', RERANK=False)
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    engine.run(save_dir=str(Path(s.EXPERIMENTS_DIR) / 'cuhk03'), test_only=True,
               use_metric_cuhk03=True)
    assert len(engine.results[-1]['cmc']) == 3
    assert '(no Rank-5 or above' in capsys.readouterr().out


@pytest.mark.slow
def test_training_on_a_tiny_gallery_finishes_with_metrics(tiny_gallery, tiny_settings):
    s = tiny_settings.replace(DATA_ROOT=str(tiny_gallery), MODEL_NAME='resnet18')
    run_dir = main.train(s)
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert metrics['epoch'] == 1 and len(metrics['cmc']) == 3


@pytest.mark.slow
def test_a_failed_final_evaluation_keeps_the_last_epoch(tiny_settings, monkeypatch, capsys):
    """The final checkpoint is written before the final evaluation; when that evaluation
    fails, the printed command evaluates the trained weights."""
    s = tiny_settings.replace(MODEL_NAME='resnet18', MAX_EPOCH=2, EVAL_FREQ=-1)
    trained = {}
    original = SoftmaxEngine._evaluate

    def failing_evaluation(self, *args, **kwargs):
        trained['conv1'] = unwrap(self.model).conv1.weight.detach().cpu().clone()
        raise RuntimeError('evaluation failed')
    monkeypatch.setattr(SoftmaxEngine, '_evaluate', failing_evaluation)
    with pytest.raises(RuntimeError, match='evaluation failed'):
        main.train(s)
    printed = capsys.readouterr().out
    (run_dir,) = Path(s.EXPERIMENTS_DIR).iterdir()
    final = run_dir / 'model' / 'model.pth.tar-2'
    saved = load_checkpoint(final)
    assert saved['epoch'] == 2
    assert torch.equal(saved['state_dict']['conv1.weight'], trained['conv1'])
    assert f'Training finished and its checkpoint is saved: {final}' in printed
    (command,) = [line for line in printed.splitlines()
                  if line.startswith('Evaluate it with: ')]
    words = shlex.split(command)
    assert words[:6] == ['Evaluate', 'it', 'with:', 'python', 'main.py', 'test']
    argv = words[5:]
    assert f'--WEIGHTS={final}' in argv

    monkeypatch.setattr(SoftmaxEngine, '_evaluate', original)
    assert main.main(argv) == 0
    (test_dir,) = run_dir.glob('*-test')
    assert json.loads((test_dir / 'metrics.json').read_text())['epoch'] == 2


def _csv_without_cameras(path: Path, rows) -> str:
    """A CSV own dataset (path,pid,camid,split; cameras empty: unknown) of `rows`,
    (image, person, split) each."""
    path.write_text('path,pid,camid,split\n' + ''.join(
        f'{image},{person},,{split}\n' for image, person, split in rows))
    return str(path)


def _page_rows(page: Path) -> list:
    return json.loads(re.search(r'application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))


def test_a_file_listed_as_query_and_as_gallery_is_not_its_own_match(
        tiny_data_root, tiny_settings, untrained_checkpoint, tmp_path):
    """Issue 27: without cameras (queries camid 0, gallery 1) a duplicate CSV row put the
    query's own file in the gallery, matched at distance 0."""
    market = market_data_dir(tiny_data_root)
    people = sorted(first_people(tiny_data_root, 3))
    query = next(p for p in sorted((market / 'query').glob('*.jpg'))
                 if _pid_cam(p)[0] == people[0])
    gallery = [(p, _pid_cam(p)[0], 'gallery')
               for p in sorted((market / 'bounding_box_test').glob('*.jpg'))
               if _pid_cam(p)[0] in people]
    rows = [(query, people[0], 'query')] + gallery
    s = tiny_settings.replace(MODEL_NAME='resnet18')
    scores = {}
    for name, listed in (('plain', rows), ('duplicate', rows + [(query, people[0], 'gallery')])):
        data = _csv_without_cameras(tmp_path / f'{name}.csv', listed)
        vis_dir = main.vis_rank(s.replace(TARGETS=data), weights=untrained_checkpoint)
        scores[name] = json.loads((vis_dir / 'metrics.json').read_text())
        (row,) = _page_rows(vis_dir / f'visrank_{name}' / 'index.html')
        shown = [(vis_dir / f'visrank_{name}' / unquote(m[0])).resolve() for m in row['matches']]
        assert query.resolve() not in shown                  # nor on the page and strip
    plain, duplicate = scores['plain'], scores['duplicate']
    assert duplicate['num_gallery'] == plain['num_gallery'] + 1
    assert (duplicate['rank1'], duplicate['mAP'], duplicate['cmc'][:len(plain['cmc'])]) == \
        (plain['rank1'], plain['mAP'], plain['cmc'])


def _own_file_rows(tiny_data_root, people: int, with_other_image: int) -> list:
    """CSV rows for `people` people: each one's query file also listed as gallery; the first
    `with_other_image` of them also have another gallery image; two more people's gallery
    images as distractors."""
    market = market_data_dir(tiny_data_root)
    pids = sorted(first_people(tiny_data_root, people + 2))
    gallery = {pid: [p for p in sorted((market / 'bounding_box_test').glob('*.jpg'))
                     if _pid_cam(p)[0] == pid] for pid in pids}
    rows = []
    for k, pid in enumerate(pids[:people]):
        query = next(p for p in sorted((market / 'query').glob('*.jpg')) if _pid_cam(p)[0] == pid)
        rows += [(query, pid, 'query'), (query, pid, 'gallery')]
        rows += [(gallery[pid][0], pid, 'gallery')] if k < with_other_image else []
    return rows + [(p, pid, 'gallery') for pid in pids[people:] for p in gallery[pid]]


def test_queries_matched_only_by_their_own_file_are_refused_before_any_work(
        tiny_data_root, tiny_settings, untrained_checkpoint, tmp_path):
    """Issue 27: the check counts matches as the evaluation does, never a query's own file
    (listed as gallery too) as its match: with no other match, a clear error before any
    work rather than Torchreid's "all query identities do not appear in gallery"."""
    data = _csv_without_cameras(tmp_path / 'self.csv', _own_file_rows(tiny_data_root, 2, 0))
    s = tiny_settings.replace(MODEL_NAME='resnet18', TARGETS=data)
    with pytest.raises(UserError, match=r"has nothing to match: none of its 2 query images .*"
                                        r"2 of them .*own file"):
        checks.check_before_run(s, training=False)
    with pytest.raises(UserError, match='has nothing to match'):
        main.test(s, weights=untrained_checkpoint)
    assert not Path(s.EXPERIMENTS_DIR).exists()


def test_queries_matched_only_by_their_own_file_are_not_counted(tiny_data_root, tiny_settings,
                                                                tmp_path, capsys):
    data = _csv_without_cameras(tmp_path / 'half.csv', _own_file_rows(tiny_data_root, 2, 1))
    checks.check_before_run(tiny_settings.replace(TARGETS=data), training=False)
    assert re.search(r'Note: 1 of the 2 queries of ".*half.csv" has no match from another '
                     r'camera in the gallery \(1 of them only its own file', capsys.readouterr().out)
