"""Checkpoints: Torchreid's load on current PyTorch, nothing in a file is ever executed."""
import os
import pickle

import numpy as np
import pytest
import torch
from torchreid.reid.models import build_model
from torchreid.reid.utils import save_checkpoint as torchreid_save_checkpoint

from reidkit.checkpoints import load_checkpoint, load_weights, save_checkpoint
from reidkit.errors import UserError


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


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path):
    path = save_checkpoint({'state_dict': {}, 'epoch': 2}, tmp_path / 'model' / 'model.pth.tar-2')
    assert load_checkpoint(path)['epoch'] == 2
    assert [p.name for p in path.parent.iterdir()] == ['model.pth.tar-2']


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
