"""A full disk is a message naming the file, never a traceback, a signal or a half-written file.

Each writer is tried on a disk that fails its writes (the `full_disk` fixture: the file opens,
its first write raises ENOSPC) and, where this process may mount one, on a real 64 KiB tmpfs
filled to the last byte."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from conftest import fill
from reidkit.evaluate import report
from reidkit.evaluate import visrank
from reidkit.run import atomic
from reidkit.run.errors import UserError
from reidkit.run.folders import write_settings
from reidkit.run.log import log_to

FULL = 'No space left on device'


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob('*') if 'partial' in p.name)


def test_settings_json_on_a_full_disk_is_a_message_and_leaves_nothing(tmp_path, full_disk):
    s = main.load_settings()
    with pytest.raises(UserError) as error:
        write_settings(tmp_path, s)
    assert str(error.value).startswith(
        f'could not write the run\'s settings "{tmp_path / "settings.json"}" ({FULL}).')
    assert list(tmp_path.iterdir()) == []                  # no settings.json, no .partial


def test_settings_json_on_a_real_full_tmpfs(tiny_tmpfs):
    s = main.load_settings()
    write_settings(tiny_tmpfs, s)                          # fits while there is room
    before = (tiny_tmpfs / 'settings.json').read_text()
    fill(tiny_tmpfs)
    with pytest.raises(UserError, match=f'settings.json" \\({FULL}\\)'):
        write_settings(tiny_tmpfs, s.replace(LR=0.5))
    assert (tiny_tmpfs / 'settings.json').read_text() == before   # the old one, whole
    assert leftovers(tiny_tmpfs) == []


def _metrics_inputs():
    result = {'target': 'market1501', 'dataset': 'market1501', 'cmc': np.array([0.5, 1.0, 1.0]),
              'mAP': 0.6, 'mINP': 0.4, 'num_query': 2, 'num_gallery': 3, 'num_query_ids': 2,
              'num_gallery_ids': 2}
    return [result], {'DEVICE': 'cpu'}


def test_metrics_json_is_written_whole_or_not_at_all(tmp_path, full_disk, monkeypatch):
    path = tmp_path / 'metrics.json'
    path.write_text('{"mode": "train", "rank1": 0.25}\n')   # an earlier mode's, say
    results, settings = _metrics_inputs()
    with pytest.raises(UserError, match=f'could not write the metrics "{path}" \\({FULL}\\)'):
        report.write_metrics(path, results, report.RunFacts('test', settings, None, 1.0))
    assert json.loads(path.read_text())['rank1'] == 0.25   # never half a file
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    report.write_metrics(path, results, report.RunFacts('test', settings, None, 1.0))
    assert json.loads(path.read_text())['mode'] == 'test'


def test_rank_strips_gallery_page_and_plots_on_a_full_disk(tmp_path, full_disk):
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    paths = []
    for i in range(3):
        paths.append(images / f'{i}.jpg')
        Image.new('RGB', (16, 32), (40 * i, 0, 0)).save(paths[-1])
    strip = visrank.draw_strip((str(paths[0]), ['q', '']), [(str(paths[1]), ['', ''], None)])
    out = tmp_path / 'out'
    with pytest.raises(UserError, match=f'could not write the rank strip ".*s.jpg" \\({FULL}\\)'):
        visrank.save_strip(out / 's.jpg', strip)
    dataset = ([(str(paths[0]), 0, 0)], [(str(paths[1]), 0, 1), (str(paths[2]), 1, 1)])
    with pytest.raises(UserError, match=f'could not write the rank strip .*\\({FULL}\\)'):
        visrank.write_rankings(np.zeros((1, 2)), dataset, save_dir=out / 'visrank', topk=2,
                               workers=2)
    with pytest.raises(UserError, match=f'could not write the gallery page .*\\({FULL}\\)'):
        report.write_gallery_page(out / 'index.html', [], {'mAP': 0.5, 'rank1': 0.5}, 2)
    with pytest.raises(UserError, match=f'could not write the CMC plot .*\\({FULL}\\)'):
        report.plot_cmc([0.5, 1.0], out / 'cmc.png')
    assert leftovers(out) == [] and not list(out.rglob('*.jpg')) and not list(out.rglob('*.png'))


def test_a_log_that_cannot_be_written_is_dropped_with_a_note(tmp_path, capsys, monkeypatch):
    class FullLog:
        name = str(tmp_path / 'log.txt')

        def write(self, text):
            raise OSError(errno.ENOSPC, FULL)

        def flush(self):
            raise OSError(errno.ENOSPC, FULL)

        def close(self):
            raise OSError(errno.ENOSPC, FULL)
    import reidkit.run.log as log
    monkeypatch.setattr(log, 'open', lambda *args, **kwargs: FullLog(), raising=False)
    with log_to(tmp_path / 'log.txt'):
        print('epoch 1')
        print('epoch 2')
    printed = capsys.readouterr().out
    assert 'epoch 1' in printed and 'epoch 2' in printed
    assert printed.count(f'could not be written ({FULL})') == 1


def test_tensorboard_on_a_full_disk_is_a_note_and_training_goes_on(tiny_settings, monkeypatch,
                                                                    capfd):
    from tensorboard.summary.writer.record_writer import RecordWriter

    def full(self, data):
        raise OSError(errno.ENOSPC, FULL)
    monkeypatch.setattr(RecordWriter, 'write', full)
    run_dir = main.train(tiny_settings)
    out, err = capfd.readouterr()
    assert (run_dir / 'model' / 'model.pth.tar-1').is_file()
    assert json.loads((run_dir / 'metrics.json').read_text())['mode'] == 'train'
    assert out.count('Note: the TensorBoard events') == 1 and f'({FULL})' in out
    assert 'Traceback' not in err and 'Exception in thread' not in err


def test_main_turns_any_other_full_disk_into_a_message(monkeypatch, capsys):
    def full(*args):
        raise OSError(errno.ENOSPC, FULL, '/data/out/thing.bin')
    monkeypatch.setattr(main, '_run_modes', full)
    assert main.main(['test']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: the disk is full ({FULL} writing "/data/out/thing.bin")')


def test_a_checkpoints_short_write_is_the_same_message(tmp_path, monkeypatch):
    from reidkit.run.checkpoints import save_checkpoint
    monkeypatch.setattr(torch, 'save', lambda *a: (_ for _ in ()).throw(
        RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0')))
    with pytest.raises(UserError, match='could not write the checkpoint .*unexpected pos'):
        save_checkpoint({'state_dict': {}}, tmp_path / 'model.pth.tar-1')
    assert list(tmp_path.iterdir()) == []


def test_the_helper_names_the_disk_full_error_inside_a_library_error():
    inner = OSError(errno.ENOSPC, FULL)
    try:
        try:
            raise inner
        except OSError as error:
            raise RuntimeError('exporter failed') from error
    except RuntimeError as outer:
        assert atomic.disk_full(outer) is inner
    assert atomic.disk_full(RuntimeError('other')) is None


def test_a_partial_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    killed = tmp_path / f'.settings.json.{gone}.partial'       # a process that no longer runs
    running = tmp_path / f'.settings.json.{os.getppid()}.partial'  # one that does
    killed.write_text('{"half": ')
    running.write_text('{"being written": ')
    atomic.write_atomically(tmp_path / 'settings.json', '{}\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, 'settings.json']
