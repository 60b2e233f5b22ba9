"""What the console shows a new user: the data said once in our words (not Torchreid's tables,
three times a demo), progress bars that never run into other lines when piped to a file."""
import io
import time
from pathlib import Path

import pytest

import main
from reidkit.data.summary import quiet_data_manager
from reidkit.run import progress as progress_module
from reidkit.run.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_short_bar_leaves_no_trace_when_piped(capsys):
    for _ in progress(range(50), desc='Extracting', unit='img', leave=False):
        pass
    with progress(total=3, desc='Index') as bar:
        bar.update(3)
    assert capsys.readouterr().err == ''


def test_a_long_bar_writes_whole_lines_when_piped(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, 'PIPED_EVERY_S', 0.01)
    for _ in progress(range(4), desc='Extracting', unit='img', leave=False):
        time.sleep(0.03)
        print('a line of our own')
    err = capsys.readouterr().err
    assert '\r' not in err and err.endswith('\n')
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith('Extracting:') for line in lines)   # no blank redraw


def test_a_terminal_gets_the_redrawn_bar():
    terminal = Terminal()
    for _ in progress(range(3), desc='Extracting', file=terminal):
        pass
    assert '\r' in terminal.getvalue() and '3/3' in terminal.getvalue()


def test_the_data_is_said_once_in_our_words(tiny_settings, capsys):
    s = tiny_settings.replace(MODEL_NAME='resnet18', DEVICE='cpu')
    datamanager, model, _, _ = main.get_items(s)
    out = capsys.readouterr().out
    train = len(datamanager.train_loader.dataset.train)
    query = len(datamanager.test_dataset['market1501']['query'])
    gallery = len(datamanager.test_dataset['market1501']['gallery'])
    assert out.splitlines() == [
        f'Training data: market1501: 8 identities, {train} images, '
        f'{datamanager.num_train_cams} cameras, at 32x16 with random_flip, random_crop',
        f'Test data: market1501: {query} queries of 8 identities, {gallery} gallery images of '
        f'{len({row[1] for row in datamanager.test_dataset["market1501"]["gallery"]})} '
        f'identities, {datamanager.num_train_cams} cameras']
    # test and visrank: the targets' data alone, never a "train (source)" set
    main.get_items(s, {'state_dict': model.state_dict()})
    assert capsys.readouterr().out.splitlines() == out.splitlines()[1:]


def test_torchreid_s_lines_are_shown_when_building_the_data_fails(capsys):
    def failing():
        print('=> Loading train (source) dataset')
        raise RuntimeError('no such folder')
    with pytest.raises(RuntimeError):
        quiet_data_manager(failing)
    assert '=> Loading train (source) dataset' in capsys.readouterr().err


@pytest.mark.slow
def test_a_training_and_its_test_as_a_new_user_reads_them(tiny_settings, capsys, monkeypatch,
                                                           tmp_path):
    monkeypatch.chdir(tmp_path)
    s = tiny_settings.replace(MODEL_NAME='resnet18', MAX_EPOCH=1, EXPERIMENTS_DIR='experiments')
    run = main.train(s)
    trained = capsys.readouterr()
    assert run == tmp_path / 'experiments' / run.name       # absolute, as every path printed
    assert f'Run folder: {run}\n' in trained.out
    checkpoint = run / 'model' / 'model.pth.tar-1'
    assert trained.out.count(f'Checkpoint saved to "{checkpoint}"') == 1
    assert trained.out.count('Training data:') == 1 and trained.out.count('Test data:') == 1
    main.test(s, checkpoint)
    tested = capsys.readouterr()
    assert 'Training data' not in tested.out and 'train (source)' not in tested.out
    for printed in (trained, tested):
        assert '\r' not in printed.out + printed.err
        assert '----' not in printed.out and 'Summary' not in printed.out   # Torchreid's tables


def test_one_query_is_one_query():
    from reidkit.evaluate.verification import describe
    verification = {'distance': 'euclidean', 'rerank': False, 'auc': None, 'tpr_at_fpr': {},
                    'pairs': {'positive': 1, 'negative': 3}}
    open_set = {'queries': 1, 'mated': 1, 'dir_at_fpir': {},
                'threshold': {'distance': None, 'fpir': 0.01}}
    assert '1 query, 1 mated' in describe(verification, open_set)[2]


def test_the_default_model_is_named_by_its_absolute_path(tmp_path, monkeypatch, capsys):
    from reidkit.run.checkpoints import save_checkpoint
    from reidkit.run.folders import default_checkpoint
    monkeypatch.chdir(tmp_path)
    save_checkpoint({'state_dict': {}, 'epoch': 1}, tmp_path / 'experiments' / 'run' / 'model'
                    / 'model.pth.tar-1')
    path = default_checkpoint(Path('experiments'))
    assert path == tmp_path / 'experiments' / 'run' / 'model' / 'model.pth.tar-1'
    assert capsys.readouterr().out.endswith(f'to choose): {path}\n')
