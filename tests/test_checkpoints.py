"""Checkpoints: Torchreid's load on current PyTorch, nothing in a file is ever executed."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchreid.reid.models import build_model
from torchreid.reid.utils import save_checkpoint as torchreid_save_checkpoint

from reidkit.run.checkpoints import load_checkpoint, load_weights, save_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.model import PLAIN


def _model(name='resnet18', num_classes=5):
    return build_model(name, num_classes=num_classes, loss='softmax', pretrained=False)


def test_a_checkpoint_saved_by_torchreid_itself_loads_safely(tmp_path):
    model = _model()
    # Torchreid's engine stores rank1 as a numpy scalar; torch.load(weights_only=True) refuses it.
    torchreid_save_checkpoint({'state_dict': model.state_dict(), 'epoch': 3,
                               'rank1': np.float64(0.5)}, str(tmp_path))
    path = tmp_path / 'model.pth.tar-3'
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    checkpoint = load_checkpoint(path)
    assert checkpoint['epoch'] == 3 and checkpoint['rank1'] == 0.5
    fresh = _model()
    load_weights(fresh, load_checkpoint(path), 'resnet18', path)
    assert torch.equal(fresh.conv1.weight, model.conv1.weight)


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch PWNED',))


def test_a_crafted_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'epoch': _Payload()}, path)
    with pytest.raises(UserError, match='refused without running it'):
        load_checkpoint(path)
    assert not (tmp_path / 'PWNED').exists()


def test_truncated_missing_and_foreign_files_are_named(tmp_path):
    path = save_checkpoint({'state_dict': _model().state_dict(), 'epoch': 1}, tmp_path / 'ok')
    (tmp_path / 'cut').write_bytes(path.read_bytes()[:5000])
    (tmp_path / 'text').write_text('hello')
    for name in ('cut', 'text'):
        with pytest.raises(UserError, match=f'{name}" is not a readable PyTorch checkpoint'):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError, match='no checkpoint file at'):
        load_checkpoint(tmp_path / 'missing')


def test_a_save_interrupted_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = save_checkpoint({'state_dict': {'w': torch.ones(3)}, 'epoch': 1},
                           tmp_path / 'model' / 'latest.pth.tar')
    before = path.read_bytes()
    real_save = torch.save
    seen_during_write = []

    def killed_mid_write(state, handle):
        real_save(state, handle)
        handle.flush()
        # the new bytes went to another file: the checkpoint on disk is still the old one
        seen_during_write.append((Path(handle.name) != path, path.read_bytes() == before))
        handle.truncate(handle.tell() // 2)          # then the write stops half way
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {'w': torch.zeros(3)}, 'epoch': 2}, path)
    assert seen_during_write == [(True, True)]
    assert path.read_bytes() == before                             # byte for byte
    assert [p.name for p in path.parent.iterdir()] == ['latest.pth.tar']   # no partial file
    assert load_checkpoint(path)['epoch'] == 1
    monkeypatch.setattr(torch, 'save', real_save)
    save_checkpoint({'state_dict': {'w': torch.zeros(3)}, 'epoch': 2}, path)   # and it goes on
    assert load_checkpoint(path)['epoch'] == 2


def test_other_identities_load_with_a_note_other_architecture_is_an_error(tmp_path, capsys):
    path = save_checkpoint({'state_dict': _model(num_classes=7).state_dict(),
                            'model_name': 'resnet18'}, tmp_path / 'a')
    load_weights(_model(num_classes=5), load_checkpoint(path), 'resnet18', path)
    assert 'classifier' in capsys.readouterr().out
    with pytest.raises(UserError, match="saved from resnet18.*MODEL_NAME='resnet50'"):
        load_weights(_model('resnet50'), load_checkpoint(path), 'resnet50', path)


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    import errno
    path = tmp_path / 'model' / 'latest.pth.tar'
    save_checkpoint({'state_dict': {'w': torch.ones(2)}, 'epoch': 1}, path)

    def disk_full(obj, handle):
        handle.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UserError) as error:
        save_checkpoint({'state_dict': {'w': torch.zeros(2)}, 'epoch': 2}, path)
    message = str(error.value)
    assert message.startswith(f'could not write the checkpoint "{path}" (No space left on device)')
    assert '\n' not in message
    assert sorted(p.name for p in path.parent.iterdir()) == ['latest.pth.tar']
    assert load_checkpoint(path)['epoch'] == 1


# --- a checkpoint trained on other identities, for every architecture ------------------------

def _other_identities(name: str, tmp_path, trained: int = 5, testing: int = 7):
    """(the model a command builds, what loading a checkpoint of `trained` identities into it
    left there, that checkpoint's weights, its contents): through our own loader."""
    torch.manual_seed(0)
    saved_model = _model(name, trained)
    path = save_checkpoint({'state_dict': saved_model.state_dict(), 'model_name': name},
                           tmp_path / 'model.pth.tar-1')
    saved = load_checkpoint(path)
    model = _model(name, testing)
    load_weights(model, saved, name, path)
    return model, saved_model.state_dict(), saved


def _same_features_weights(model, saved_state, classifier) -> bool:
    return all(torch.equal(value, saved_state[key]) for key, value in model.state_dict().items()
               if key not in classifier)


def test_a_hacnn_checkpoint_of_other_identities_loads_for_test_and_search(tmp_path, capsys):
    from reidkit.run.checkpoints import checkpoint_classes, classifier_keys
    from reidkit.search.extractor import checkpoint_model
    model, state, saved = _other_identities('hacnn', tmp_path)
    assert classifier_keys('hacnn') == {'classifier_global.weight', 'classifier_global.bias',
                                        'classifier_local.weight', 'classifier_local.bias'}
    assert _same_features_weights(model, state, classifier_keys('hacnn'))
    assert checkpoint_classes(saved, 'hacnn') == 5
    assert 'classifier was trained on other identities' in capsys.readouterr().out
    searched = checkpoint_model(saved, tmp_path / 'model.pth.tar-1',
                                {**PLAIN, 'MODEL_NAME': 'hacnn'})
    assert _same_features_weights(searched, state, classifier_keys('hacnn'))


def test_a_checkpoint_of_another_architecture_is_still_refused_with_a_classifier_key(tmp_path):
    path = save_checkpoint({'state_dict': _model('hacnn', 5).state_dict(),
                            'model_name': 'hacnn'}, tmp_path / 'c')
    with pytest.raises(UserError, match="saved from hacnn.*MODEL_NAME='osnet_x0_25'.*first: "
                                        "'(?!classifier)"):
        load_weights(_model('osnet_x0_25'), load_checkpoint(path), 'osnet_x0_25', path)


def _architectures():
    from torchreid.reid.models import __model_factory
    return sorted(__model_factory)


@pytest.mark.slow
@pytest.mark.parametrize('name', _architectures())
def test_every_architecture_loads_a_checkpoint_of_other_identities(name, tmp_path):
    """All 49 of Torchreid 0.2.5's models build on the CPU (85 s for all of them here)."""
    from reidkit.run.checkpoints import checkpoint_classes, classifier_keys
    model, state, saved = _other_identities(name, tmp_path)
    classifier = classifier_keys(name)
    assert classifier and all(state[key].shape[0] == 5 for key in classifier)
    assert _same_features_weights(model, state, classifier)
    assert checkpoint_classes(saved, name) == 5
    saved['state_dict'] = {f'module.{key}': value for key, value in saved['state_dict'].items()}
    assert checkpoint_classes(saved, name) == 5            # saved from DataParallel


def test_hacnn_on_the_cpu_is_refused_before_any_work_as_cuda_only(tiny_data_root, tmp_path,
                                                                    monkeypatch):
    """Torchreid's HACNN calls .cuda() in its forward pass: its checkpoint loads on the CPU,
    but `test` there is a clear error up front, not a traceback after loading the data."""
    import main
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    path = save_checkpoint({'state_dict': _model('hacnn', 99).state_dict(), 'epoch': 1,
                            'model_name': 'hacnn', 'input_size': [160, 64]}, tmp_path / 'h.pth')
    s = main.load_settings(dict(DATA_ROOT=str(tiny_data_root), WORKERS=0,
                                EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    with pytest.raises(UserError, match="MODEL_NAME='hacnn' runs on CUDA only"):
        main.test(s, path)
    assert not (tmp_path / 'experiments').exists()
