"""export: a checkpoint becomes one model.onnx whose onnxruntime features are PyTorch's."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import main
from reidkit.run.checkpoints import save_checkpoint
from reidkit.run.errors import UserError
from reidkit.search import export as exporting
from reidkit.search.onnx_features import OnnxExtractor

ROOT = Path(__file__).resolve().parents[1]
# resnet18 exports in seconds; 64x32 is the demo's input size.
SMALL = dict(MODEL_NAME='resnet18', HEIGHT=64, WIDTH=32)


def _checkpoint(s, num_classes: int = 8) -> Path:
    """A checkpoint as training writes it (weights, epoch, the run's settings), in a run
    folder under EXPERIMENTS_DIR; untrained weights are enough to compare two runtimes."""
    from torchreid.reid.models import build_model
    torch.manual_seed(0)
    model = build_model(s.MODEL_NAME, num_classes=num_classes, loss='softmax', pretrained=False)
    return save_checkpoint({'state_dict': model.state_dict(), 'epoch': 3,
                            'model_name': s.MODEL_NAME, 'input_size': [s.HEIGHT, s.WIDTH],
                            'settings': s.record()},
                           Path(s.EXPERIMENTS_DIR) / 'run' / 'model' / 'model.pth.tar-3')


def _export(s, weights=None) -> tuple[Path, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        path = main.export(s, weights)
    return path, printed.getvalue()


@pytest.fixture(scope='module')
def exported(module_tmp_path, tiny_data_root):
    from conftest import TINY
    experiments = module_tmp_path / 'experiments'
    s = main.load_settings(dict(TINY, **SMALL, DATA_ROOT=str(tiny_data_root),
                                EXPERIMENTS_DIR=str(experiments)))
    checkpoint = _checkpoint(s)
    path, printed = _export(s)          # WEIGHTS empty: the newest run's checkpoint
    return s, checkpoint, path, printed


def _test_images(s, count: int) -> list:
    folder = Path(s.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15' / 'query'
    return [Image.open(p).convert('RGB') for p in sorted(folder.glob('*.jpg'))[:count]]


def _torch_features(s, checkpoint: Path, images: list) -> np.ndarray:
    from reidkit.run.checkpoints import load_checkpoint
    from reidkit.search.extractor import checkpoint_model, quiet_test_transform
    model = checkpoint_model(load_checkpoint(checkpoint), checkpoint, s)
    transform = quiet_test_transform(s.HEIGHT, s.WIDTH)
    with torch.no_grad():
        return model.eval()(torch.stack([transform(im) for im in images])).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_one_checked_file_beside_the_checkpoint_with_its_metadata(exported):
    s, checkpoint, path, printed = exported
    assert path == checkpoint.parent / 'model.onnx'
    assert sorted(p.name for p in path.parent.iterdir()) == ['model.onnx', checkpoint.name]
    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in model.graph.initializer)              # self-contained
    assert model.opset_import[0].version == exporting.OPSET
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata['model_name'] == 'resnet18' and metadata['feature_dim'] == '512'
    assert (metadata['input_height'], metadata['input_width']) == ('64', '32')
    assert json.loads(metadata['mean']) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(metadata['std']) == pytest.approx([0.229, 0.224, 0.225])
    assert (metadata['checkpoint'], metadata['epoch']) == ('model.pth.tar-3', '3')
    assert 'test images of market1501' in printed and 'RANDOM' not in printed
    cosine = float(printed.split('cosine min ')[1].split()[0])
    assert cosine >= 0.9999 and 'max abs diff' in printed


def test_any_batch_size_gives_pytorchs_features(exported):
    s, checkpoint, path, _ = exported
    extractor = OnnxExtractor(path)
    assert (extractor.height, extractor.width, extractor.feature_dim) == (64, 32, 512)
    images = _test_images(s, 8)
    expected = _torch_features(s, checkpoint, images)
    one, seven = extractor(images[:1]), extractor(images[1:])
    assert one.shape == (1, 512) and seven.shape == (7, 512) and one.dtype == np.float32
    assert _cosines(np.concatenate([one, seven]), expected).min() >= 0.9999
    assert extractor([]).shape == (0, 512)
    as_arrays = extractor([np.asarray(im) for im in images[:2]])   # HxWx3 uint8 works too
    np.testing.assert_array_equal(as_arrays, extractor(images[:2]))


def test_the_extractor_runs_without_torchreid(exported, tmp_path):
    s, checkpoint, path, _ = exported
    images = sorted((Path(s.DATA_ROOT) / 'market1501').rglob('query/*.jpg'))[:5]
    script = (
        'import sys; sys.path.insert(0, sys.argv[1])\n'
        'import numpy as np\n'
        'from PIL import Image\n'
        'from reidkit.search.onnx_features import OnnxExtractor\n'
        'features = OnnxExtractor(sys.argv[2])([Image.open(p) for p in sys.argv[4:]])\n'
        'np.save(sys.argv[3], features)\n'
        "assert 'torchreid' not in sys.modules, 'torchreid was imported'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = tmp_path / 'features.npy'
    subprocess.run([sys.executable, '-c', script, str(ROOT), str(path), str(out),
                    *map(str, images)], check=True, cwd=tmp_path, timeout=600)
    expected = _torch_features(s, checkpoint, [Image.open(p).convert('RGB') for p in images])
    assert _cosines(np.load(out), expected).min() >= 0.9999


def test_an_existing_model_onnx_is_never_overwritten(exported):
    s, checkpoint, path, _ = exported
    before = path.read_bytes()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main.main(['export', f'--WEIGHTS={checkpoint}',
                          f'--EXPERIMENTS_DIR={s.EXPERIMENTS_DIR}']) == 0
    second = path.with_name('model-2.onnx')
    assert second.is_file() and path.read_bytes() == before
    assert 'model.onnx" exists and is kept; this export is model-2.onnx' in printed.getvalue()
    second.unlink()


def test_without_the_data_it_checks_on_random_images_and_says_so(exported, tmp_path):
    s, checkpoint, _, _ = exported
    weights = tmp_path / 'elsewhere' / checkpoint.name
    weights.parent.mkdir()
    weights.write_bytes(checkpoint.read_bytes())
    path, printed = _export(s.replace(DATA_ROOT=str(tmp_path / 'no-data')), weights)
    assert path == weights.parent / 'model.onnx'
    assert 'RANDOM images, not on real people' in printed and 'market1501' in printed
    assert 'ONNX check on 16 random images' in printed


def test_a_failed_check_keeps_nothing(exported, tmp_path, monkeypatch):
    s, checkpoint, _, _ = exported
    weights = tmp_path / checkpoint.name
    weights.write_bytes(checkpoint.read_bytes())
    monkeypatch.setattr(exporting, 'MIN_COSINE', 2.0)      # no cosine reaches it
    with pytest.raises(UserError, match=r'cosine min 1\.0+ \(must be >= 2\.0\)\. .* so it was '
                                        r'not kept'):
        _export(s, weights)
    assert [p.name for p in tmp_path.iterdir()] == [weights.name]    # no model, no partial


def test_files_that_are_not_our_models_are_named(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='no ONNX model at .*main.py export'):
        OnnxExtractor(tmp_path / 'missing.onnx')
    text = tmp_path / 'notes.onnx'
    text.write_text('not a model')
    with pytest.raises(UserError, match='"[^"]*notes.onnx" is not an ONNX model onnxruntime '):
        OnnxExtractor(text)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node('Identity', ['x'], ['y'])], 'plain',
        [onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, ['n', 3, 8, 4])],
        [onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, ['n', 3, 8, 4])])
    plain = tmp_path / 'plain.onnx'
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 18)]),
              str(plain))
    with pytest.raises(UserError, match='not one written by `python main.py export`: its '
                                        'metadata lacks model_name, input_height'):
        OnnxExtractor(plain)
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)    # as if not installed
    with pytest.raises(UserError, match='onnxruntime is not installed.*pip install onnxruntime'):
        OnnxExtractor(plain)


def test_a_missing_exporter_package_is_named_before_any_work(tiny_settings, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'onnxscript' else find_spec(name, *a))
    with pytest.raises(UserError, match=r'export needs onnxscript, which is not installed\. '
                                        r'Install with `pip install onnxscript`'):
        main.export(tiny_settings)      # no checkpoint anywhere: that error would come later


@pytest.mark.slow
def test_search_with_the_onnx_file_ranks_like_the_checkpoint_without_torchreid(exported,
                                                                               tmp_path):
    """search --WEIGHTS=model.onnx: onnxruntime features, no Torchreid import on that path,
    and the same top matches as the PyTorch checkpoint's search (FLIP_TEST too)."""
    s, checkpoint, path, _ = exported
    data = Path(s.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15'
    query = sorted((data / 'query').glob('*.jpg'))[0]
    code = (
        'import json, sys\n'
        'from pathlib import Path\n'
        'import config\n'
        'from reidkit.run.settings import Settings, defaults_from, apply_overrides\n'
        'from reidkit.search.command import run_search\n'
        'values = apply_overrides(defaults_from(config), json.loads(sys.argv[1]))\n'
        'out = run_search(Settings(values), Path(sys.argv[2]))\n'
        'assert "torchreid" not in sys.modules, "torchreid was imported"\n'
        'print(out)\n')
    for flip in (False, True):
        overrides = dict(QUERY=str(query), GALLERY=str(data / 'bounding_box_test'),
                         EXPERIMENTS_DIR=str(tmp_path / f'exp-{flip}'), FLIP_TEST=flip,
                         SEARCH_TOPK=5)
        done = subprocess.run([sys.executable, '-c', code, json.dumps(overrides), str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        onnx_csv = (Path(done.stdout.strip().splitlines()[-1]) / query.name / 'results.csv')
        torch_out = main.search(s.replace(**overrides), checkpoint)
        torch_csv = torch_out / query.name / 'results.csv'
        ranked = [[row.split(',')[1] for row in csv.read_text().splitlines()[1:6]]
                  for csv in (onnx_csv, torch_csv)]
        assert ranked[0] == ranked[1]


@pytest.mark.parametrize('stage', ['exporter', 'metadata'])
def test_a_full_disk_during_export_is_a_message_and_keeps_nothing(exported, tmp_path,
                                                                   monkeypatch, stage):
    import errno
    s, checkpoint, _, _ = exported
    weights = tmp_path / checkpoint.name
    weights.write_bytes(checkpoint.read_bytes())

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError as error:        # the exporter wraps it in its own error type
            raise RuntimeError('Failed to save the ONNX model') from error
    if stage == 'exporter':
        monkeypatch.setattr(torch.onnx, 'export', full)
    else:
        monkeypatch.setattr(onnx, 'save', lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, 'No space left on device')))
    with pytest.raises(UserError) as error:
        _export(s, weights)
    assert str(error.value).startswith(f'could not write the ONNX model '
                                       f'"{tmp_path / "model.onnx"}" (No space left on device)')
    assert [p.name for p in tmp_path.iterdir()] == [weights.name]    # no model, no partial
