"""What a new user trips over (issue 23): messages that point the right way, a test suite that
does not fill the disk, lines that say what ran."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main
from reidkit.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_passing_tests_leave_nothing_in_the_temp_folder(tmp_path):
    """The project's pytest.ini keeps a test's tmp_path only when the test failed."""
    probe = tmp_path / 'probe'
    probe.mkdir()
    (probe / 'pytest.ini').write_text((ROOT / 'pytest.ini').read_text())
    (probe / 'test_probe.py').write_text(
        "def test_passes(tmp_path):\n    (tmp_path / 'big').write_bytes(b'x' * 10 ** 6)\n\n"
        "def test_fails(tmp_path):\n    (tmp_path / 'kept').write_text('x')\n    assert False\n")
    temproot = tmp_path / 'temproot'
    temproot.mkdir()
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'test_probe.py'], cwd=probe, capture_output=True, text=True,
                          env=dict(os.environ, PYTEST_DEBUG_TEMPROOT=str(temproot)), timeout=600)
    assert '1 failed, 1 passed' in done.stdout, done.stdout[-2000:]
    left = {path.name for path in temproot.rglob('*') if path.is_file()}
    assert 'kept' in left and 'big' not in left


def test_an_onnx_file_given_to_test_says_what_serves_it(tiny_settings, tmp_path):
    model_dir = tmp_path / 'run' / 'model'
    model_dir.mkdir(parents=True)
    (model_dir / 'model.pth.tar-3').write_bytes(b'not read')
    onnx_file = model_dir / 'model.onnx'
    onnx_file.write_bytes(b'\x08\x07\x12\x07pytorch')        # the start of an ONNX protobuf
    for step in (main.test, main.vis_rank, main.export):
        with pytest.raises(UserError) as error:
            step(tiny_settings.replace(WEIGHTS=str(onnx_file)))
        message = str(error.value)
        assert 'is an ONNX model' in message and 'serves search only' in message
        assert f'--WEIGHTS={model_dir / "model.pth.tar-3"}' in message
        assert 'not a readable PyTorch checkpoint' not in message
    with pytest.raises(UserError, match='RESUME: .* is an ONNX model'):
        main.train(tiny_settings.replace(RESUME=str(onnx_file)))


# Appended to a copy of a page: counts the tiles whose caption sticks out of the tile.
OVERFLOW_PROBE = '''<script>
const tiles = [...document.querySelectorAll('figure')];
const out = tiles.filter(f => [...f.querySelectorAll('figcaption')].some(
  c => c.scrollWidth > c.clientWidth + 1 ||
       c.getBoundingClientRect().right > f.getBoundingClientRect().right + 1)).length;
document.body.dataset.tiles = tiles.length; document.body.dataset.overflow = out;
</script>'''


def test_search_page_captions_stay_inside_their_tiles(tmp_path):
    from test_report import CHROMIUM, CHROMIUM_FLAGS
    if CHROMIUM is None:
        pytest.skip('Chromium is not installed (Debian package "chromium"; .ci/run installs it)')
    import re
    import numpy as np
    from PIL import Image
    from reidkit.search.writers import QueryResult, write_results
    names = ['person_0001_c1s1_000151_01_from_the_lobby_camera.jpg', 'x.jpg',
             'IMG_20240611_173455_HDR_portrait_mode_cropped_again.png', 'a' * 80 + '.jpg']
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for name in names:
        Image.new('RGB', (32, 64), (120, 60, 30)).save(gallery / name)
    query = gallery / names[0]
    out_dir = tmp_path / 'result'
    paths = [str(gallery / name) for name in names]
    write_results(out_dir, QueryResult(query, paths, np.arange(len(names)),
                                       np.linspace(0.1, 2.0, len(names)), skipped=[]), topk=4)
    page = out_dir / 'index.html'
    probe = out_dir / 'probe.html'
    probe.write_text(page.read_text().replace('</body>', OVERFLOW_PROBE + '</body>'))
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f'--user-data-dir={tmp_path / "profile"}',
                          '--dump-dom', probe.as_uri()], capture_output=True, text=True,
                         timeout=600).stdout
    body = re.search(r'<body([^>]*)>', dom).group(1)
    assert re.search(r'data-tiles="5"', body), body            # the query and 4 matches
    assert re.search(r'data-overflow="0"', body), body


@pytest.mark.slow
def test_each_step_says_what_it_ran_with(tiny_settings, capsys):
    main.train(tiny_settings)
    trained = capsys.readouterr().out
    assert 'Training path: eager float32' in trained
    assert 'Evaluation: features on cpu, euclidean distance\n' in trained
    for step in (main.test, main.vis_rank):
        step(tiny_settings.replace(FLIP_TEST=True, RERANK=True, RERANK_K1=5, RERANK_K2=2))
        out = capsys.readouterr().out
        assert 'Training path' not in out
        assert ('Evaluation: features on cpu, euclidean distance, FLIP_TEST (each image '
                'averaged with its mirror), RERANK (k-reciprocal, k1=5, k2=2, lambda=0.3)') in out


def test_a_busy_cpu_gets_the_thread_hint_once_it_matters(monkeypatch):
    from reidkit.run.device import busy_cpu_note
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert busy_cpu_note(load=1.5, cores=2) is None          # an ordinary run
    assert busy_cpu_note(load=9.0, cores=1) is None          # one thread already
    note = busy_cpu_note(load=6.7, cores=2)
    assert 'load 6.7 for 2 threads' in note and 'with --CPU_THREADS=1' in note
    assert busy_cpu_note(load=6.7, cores=2, chosen=True) is None     # CPU_THREADS set
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    assert busy_cpu_note(load=6.7, cores=2) is None          # the user chose


def test_cpu_threads_is_applied_before_any_work_and_the_demo_uses_one(tmp_path, capsys):
    import torch
    import config
    assert config.DEMO['CPU_THREADS'] == 1          # the demo's figures repeat on any machine
    before = torch.get_num_threads()
    try:
        # a missing checkpoint stops the command after the settings were read
        assert main.main(['export', '--CPU_THREADS=1', f'--WEIGHTS={tmp_path / "none.pth"}',
                          f'--EXPERIMENTS_DIR={tmp_path / "exp"}']) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main.main(['--CPU_THREADS=-1', 'test', f'--EXPERIMENTS_DIR={tmp_path / "e"}']) == 2
    assert 'CPU_THREADS=-1 must be 0' in capsys.readouterr().err
